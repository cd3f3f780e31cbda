"""Stage 2: the RL math against naive loops, and `gpt2mm ppo` end to end on a tiny model and world."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2mm.cli import main
from gpt2mm.rl import core

# --- the math, each against a naive loop ------------------------------------------------------------------


def random_mask(b: int, n: int, g: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    return (torch.arange(n)[None, :] < lengths[:, None]).float()


def masked_values(x: torch.Tensor, mask: torch.Tensor) -> list[float]:
    return [float(v) for v, m in zip(x.flatten(), mask.flatten()) if m]


def test_masked_statistics_equal_the_statistics_of_the_masked_entries():
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(5, 7, generator=g, dtype=torch.float64), random_mask(5, 7, g).double()
    vals = masked_values(x, mask)
    assert math.isclose(float(core.masked_mean(x, mask)), statistics.fmean(vals), rel_tol=1e-12)
    assert math.isclose(float(core.masked_var(x, mask)), statistics.variance(vals), rel_tol=1e-12)
    white = core.masked_whiten(x, mask)
    wv = masked_values(white, mask)
    assert abs(statistics.fmean(wv)) < 1e-9 and math.isclose(statistics.stdev(wv), 1.0, rel_tol=1e-6)
    assert torch.all(white[mask == 0] == 0)
    kept = core.masked_whiten(x, mask, shift_mean=False)
    assert math.isclose(statistics.fmean(masked_values(kept, mask)), statistics.fmean(vals), rel_tol=1e-9)
    per_row = core.masked_mean(x, mask, dim=1)
    for i in range(5):
        assert math.isclose(float(per_row[i]), statistics.fmean(masked_values(x[i], mask[i])), rel_tol=1e-12)


def test_logprobs_and_entropy_equal_the_softmax_by_hand():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    logits[0, 0, 2] = float("-inf")  # a masked token (the model masks <image>)
    tokens = torch.tensor([[1, 5, 0], [2, 2, 4]])
    lp, ent = core.logprobs_from_logits(logits, tokens), core.entropy_from_logits(logits)
    for b in range(2):
        for t in range(3):
            exps = [math.exp(v) for v in logits[b, t].tolist()]
            z = sum(exps)
            probs = [e / z for e in exps]
            assert math.isclose(float(lp[b, t]), math.log(probs[tokens[b, t]]), rel_tol=1e-6)
            naive_entropy = -sum(p * math.log(p) for p in probs if p > 0)
            assert math.isclose(float(ent[b, t]), naive_entropy, rel_tol=1e-6)


def test_kl_estimators():
    g = torch.Generator().manual_seed(2)
    logp, ref = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    for (a, b), k1, k2, k3 in zip(
        zip(logp.flatten().tolist(), ref.flatten().tolist()),
        core.kl_estimate(logp, ref, "k1").flatten().tolist(),
        core.kl_estimate(logp, ref, "k2").flatten().tolist(),
        core.kl_estimate(logp, ref, "k3").flatten().tolist(),
    ):
        r = math.exp(b - a)
        assert math.isclose(k1, a - b, abs_tol=1e-6)
        assert math.isclose(k2, 0.5 * (a - b) ** 2, rel_tol=1e-5)
        assert math.isclose(k3, (r - 1) - math.log(r), rel_tol=1e-4, abs_tol=1e-6) and k3 >= 0
    with pytest.raises(ValueError, match="k1, k2 or k3"):
        core.kl_estimate(logp, ref, "k4")


def test_token_rewards_put_the_score_on_the_last_answer_token():
    g = torch.Generator().manual_seed(3)
    mask = random_mask(6, 5, g)
    kl, scores = torch.randn(6, 5, generator=g), torch.randn(6, generator=g)
    got = core.token_rewards(scores, kl, mask, kl_coef=0.3)
    for b in range(6):
        last = int(mask[b].sum()) - 1
        for t in range(5):
            want = (-0.3 * float(kl[b, t]) + (float(scores[b]) if t == last else 0.0)) if mask[b, t] else 0.0
            assert math.isclose(float(got[b, t]), want, abs_tol=1e-6)


def naive_gae(rewards: list[float], values: list[float], gamma: float, lam: float):
    n = len(rewards)
    adv = []
    for t in range(n):
        total = 0.0
        for k in range(t, n):
            next_v = values[k + 1] if k + 1 < n else 0.0
            delta = rewards[k] + gamma * next_v - values[k]
            total += (gamma * lam) ** (k - t) * delta
        adv.append(total)
    return adv, [a + v for a, v in zip(adv, values)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_equals_the_sum_of_discounted_td_errors(gamma, lam):
    g = torch.Generator().manual_seed(4)
    mask = random_mask(7, 6, g)
    rewards, values = torch.randn(7, 6, generator=g), torch.randn(7, 6, generator=g)
    adv, ret = core.gae(rewards, values, mask, gamma, lam)
    for b in range(7):
        n = int(mask[b].sum())
        want_adv, want_ret = naive_gae(rewards[b, :n].tolist(), values[b, :n].tolist(), gamma, lam)
        torch.testing.assert_close(adv[b, :n], torch.tensor(want_adv), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ret[b, :n], torch.tensor(want_ret), rtol=1e-5, atol=1e-5)
        assert torch.all(adv[b, n:] == 0) and torch.all(ret[b, n:] == 0)


def test_policy_loss_equals_the_clipped_surrogate_by_hand():
    g = torch.Generator().manual_seed(5)
    mask = random_mask(4, 5, g)
    logp, old = torch.randn(4, 5, generator=g) * 0.5, torch.randn(4, 5, generator=g) * 0.5
    adv = torch.randn(4, 5, generator=g)
    loss, stats = core.policy_loss(logp, old, adv, mask, clip_range=0.2)
    terms, clipped, kls = [], [], []
    for b in range(4):
        for t in range(5):
            if not mask[b, t]:
                continue
            r = math.exp(float(logp[b, t] - old[b, t]))
            a = float(adv[b, t])
            un, cl = -a * r, -a * min(max(r, 0.8), 1.2)
            terms.append(max(un, cl))
            clipped.append(1.0 if cl > un else 0.0)
            kls.append((r - 1) - math.log(r))
    assert math.isclose(float(loss), statistics.fmean(terms), rel_tol=1e-5)
    assert math.isclose(float(stats["clipfrac"]), statistics.fmean(clipped), rel_tol=1e-6)
    assert math.isclose(float(stats["approx_kl"]), statistics.fmean(kls), rel_tol=1e-4)
    # the gradient flows through logp only
    logp.requires_grad_(True)
    core.policy_loss(logp, old, adv, mask)[0].backward()
    assert logp.grad is not None and torch.all(logp.grad[mask == 0] == 0)


def test_value_loss_equals_the_clipped_squared_error_by_hand():
    g = torch.Generator().manual_seed(6)
    mask = random_mask(4, 5, g)
    v, old, ret = (torch.randn(4, 5, generator=g) for _ in range(3))
    loss, stats = core.value_loss(v, old, ret, mask, clip_range=0.2)
    terms, clipped = [], []
    for b in range(4):
        for t in range(5):
            if not mask[b, t]:
                continue
            vv, oo, rr = float(v[b, t]), float(old[b, t]), float(ret[b, t])
            vc = oo + min(max(vv - oo, -0.2), 0.2)
            terms.append(0.5 * max((vv - rr) ** 2, (vc - rr) ** 2))
            clipped.append(1.0 if (vc - rr) ** 2 > (vv - rr) ** 2 else 0.0)
    assert math.isclose(float(loss), statistics.fmean(terms), rel_tol=1e-5)
    assert math.isclose(float(stats["vf_clipfrac"]), statistics.fmean(clipped), rel_tol=1e-6)
    unclipped, _ = core.value_loss(v, old, ret, mask, clip_range=None)
    assert math.isclose(float(unclipped), 0.5 * float(core.masked_mean((v - ret) ** 2, mask)), rel_tol=1e-6)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.2, 0.2, 0.2, 0.9])
    rloo = core.group_advantages(rewards, 4, "rloo").tolist()
    grpo = core.group_advantages(rewards, 4, "grpo").tolist()
    for gi in range(2):
        group = rewards[gi * 4 : gi * 4 + 4].tolist()
        for i, r in enumerate(group):
            others = group[:i] + group[i + 1 :]
            assert math.isclose(rloo[gi * 4 + i], r - statistics.fmean(others), abs_tol=1e-6)
            want = (r - statistics.fmean(group)) / (statistics.stdev(group) + 1e-4)
            assert math.isclose(grpo[gi * 4 + i], want, rel_tol=1e-5)
    with pytest.raises(ValueError, match="groups of 3"):
        core.group_advantages(rewards, 3)
    with pytest.raises(ValueError, match="at least 2"):
        core.group_advantages(rewards, 1)


def test_adaptive_kl_controller_follows_its_formula_and_a_fixed_one_stays():
    ctl = core.AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(9.0, 10)  # KL above target: error 0.5 clipped to 0.2
    assert math.isclose(ctl.value, 0.1 * (1 + 0.2 * 10 / 100))
    ctl.update(5.0, 10)
    assert math.isclose(ctl.value, 0.1 * 1.02 * (1 + (5 / 6 - 1) * 0.1))
    fixed = core.AdaptiveKLController(0.1)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.1


def test_ppo_loss_learns_a_bandit():
    """The pieces together (group advantages, whitening, the clipped loss) move a softmax policy to the best
    arm of a 5-armed bandit with noiseless rewards."""
    torch.manual_seed(0)
    logits = torch.zeros(5, requires_grad=True)
    payoff = torch.tensor([0.1, 0.3, 0.9, 0.2, 0.0])
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(60):
        with torch.no_grad():
            arms = torch.multinomial(torch.softmax(logits, -1), 32, replacement=True)
            old = torch.log_softmax(logits, -1)[arms]
        adv = core.group_advantages(payoff[arms], 4, "rloo")[:, None]
        mask = torch.ones_like(adv)
        adv = core.masked_whiten(adv, mask)
        for _ in range(2):
            logp = torch.log_softmax(logits, -1)[arms][:, None]
            loss, _ = core.policy_loss(logp, old[:, None], adv, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert torch.softmax(logits, -1)[2] > 0.9


def test_answer_mask_ends_at_the_first_end_of_text():
    from gpt2mm.rl.policy import answer_mask

    eos = 0
    response = torch.tensor([[5, 0, 7, 0], [5, 6, 7, 8], [0, 0, 0, 0]])
    assert answer_mask(response, eos).long().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_reward_specs():
    from gpt2mm.rl.reward import parse_reward

    assert parse_reward("vqa") == [(1.0, "vqa")]
    assert parse_reward("0.3*vqa + 0.7*model:runs/rm") == [(0.3, "vqa"), (0.7, "model:runs/rm")]
    for bad in ("bleu", "x*vqa", "model:", "vqa+"):
        with pytest.raises(ValueError):
            parse_reward(bad)


# --- the trainer, end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from gpt2mm.data.synthetic import write_world

    root = tmp_path_factory.mktemp("world")
    write_world(root, n_train=12, n_val=4, n_test=2, seed=0)
    return root


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory) -> Path:
    from gpt2mm.loading import build_model

    torch.manual_seed(0)
    model, processor = build_model("tiny", vision_feature_layer=0)
    path = tmp_path_factory.mktemp("init")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def ppo_args(world: Path, init: Path, out: Path, *extra: str) -> list[str]:
    recipe = Path(__file__).resolve().parents[1] / "configs" / "tiny-ppo.yaml"
    return [
        "ppo", str(recipe),
        "--model.init_from", str(init), "--data.root", str(world), "--data.val_limit", "8",
        "--train.output_dir", str(out), "--train.max_steps", "4", "--train.max_minutes", "none",
        "--rollout.prompts", "8", "--train.minibatch_size", "4", "--train.eval_every", "2",
        "--train.save_every", "2", "--train.keep_last", "3", "--train.progress", "false",
        "--train.log_with", "[]", "--train.lr", "1e-3",
        *extra,
    ]  # fmt: skip


def test_rollout_logprobs_are_the_sampling_distribution(world, init_dir, tmp_path):
    """The recomputed log-probabilities of the sampled tokens equal those of `generate`'s own (temperature-
    scaled, `<image>`-masked) scores, and the policy starts at KL 0 from the reference."""
    from gpt2mm.rl.config import PPORecipe
    from gpt2mm.rl.policy import answer_logits
    from gpt2mm.rl.ppo import PPOTrainer
    from gpt2mm.train.args import build

    cfg = build(
        PPORecipe,
        {
            "model": {"init_from": str(init_dir)},
            "data": {"root": str(world)},
            "rollout": {"prompts": 6, "temperature": 0.7},
            "train": {"output_dir": str(tmp_path / "out"), "eval_every": 0, "log_with": []},
        },
    )
    trainer = PPOTrainer(cfg, log=lambda m: None)
    ro = trainer.rollout(trainer.train_samples[:6])
    assert torch.all(ro.kl == 0) and torch.equal(ro.logprobs, ro.ref_logprobs)
    assert ro.values is not None and torch.all(ro.values == 0)  # the value head starts at zero
    # generate again with the same RNG state, asking for its scores
    prompt = ro.input_ids[:, : ro.prompt_len]
    torch.manual_seed(123)
    out = trainer.policy.generate(
        input_ids=prompt, attention_mask=ro.attention_mask[:, : ro.prompt_len], vision_hidden_states=ro.vision,
        do_sample=True, temperature=0.7, top_k=0, max_new_tokens=8, output_scores=True,
        return_dict_in_generate=True, pad_token_id=trainer.pad, eos_token_id=trainer.eos,
    )  # fmt: skip
    seqs = out.sequences
    response = seqs[:, ro.prompt_len :]
    from gpt2mm.rl.policy import answer_mask

    mask = answer_mask(response, trainer.eos)
    full = torch.cat([ro.attention_mask[:, : ro.prompt_len], mask.long()], 1)
    with torch.no_grad():
        logits, _ = answer_logits(trainer.policy, seqs, full, ro.vision, ro.prompt_len, 0.7)
    mine = core.logprobs_from_logits(logits, response)
    theirs = torch.stack(
        [
            torch.log_softmax(s.float(), -1).gather(-1, response[:, i : i + 1]).squeeze(-1)
            for i, s in enumerate(out.scores)
        ],
        1,
    )
    torch.testing.assert_close(mine[mask], theirs[mask], rtol=1e-4, atol=1e-4)


def answer_length_reward(self, samples, answers):
    """A stand-in reward that a random model's answers already vary on (the VQA reward is 0 for all)."""
    return torch.tensor([min(len(a), 12) / 12 for a in answers])


def test_ppo_trains_the_policy_keeps_vision_and_reference_and_resumes_exactly(
    world, init_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr("gpt2mm.rl.reward.Reward.__call__", answer_length_reward)
    full = tmp_path / "full"
    assert main(ppo_args(world, init_dir, full)) == 0
    before, after = (
        load_file(str(init_dir / "model.safetensors")),
        load_file(str(full / "checkpoint-4" / "model.safetensors")),
    )
    for key in before:
        if key.startswith("vision_tower."):
            assert torch.equal(before[key], after[key]), f"frozen {key} changed"
    for prefix in ("projector.", "language_model.h.0."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix
    # a checkpoint is a plain model for eval / ask / serve, with the value head beside it
    from gpt2mm.loading import load_model

    model, _ = load_model(full / "checkpoint-4")
    assert torch.equal(model.projector.linear.weight, after["projector.linear.weight"])
    assert (full / "checkpoint-4" / "value_head.safetensors").is_file()
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in rows if "reward" in r]
    assert [r["step"] for r in updates] == [1, 2, 3, 4]
    for key in ("reward", "kl", "kl_coef", "entropy", "clipfrac", "vf_loss", "answer_length", "pg_loss"):
        assert all(math.isfinite(r[key]) for r in updates), key
    assert updates[0]["kl"] == 0.0  # the first rollout is sampled from the reference itself
    assert [r["step"] for r in rows if "val_accuracy" in r] == [0, 2, 4]
    assert main(["plot", str(full)]) == 0 and (full / "curves.png").stat().st_size > 1000  # reward and KL
    # stopped after update 2 and resumed: the same weights as the run that was not stopped
    part = tmp_path / "part"
    part.mkdir()
    import shutil

    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    assert main([*ppo_args(world, init_dir, part), "--resume"]) == 0
    resumed = load_file(str(part / "checkpoint-4" / "model.safetensors"))
    for key, value in after.items():
        assert torch.equal(value, resumed[key]), key
    v1 = load_file(str(full / "checkpoint-4" / "value_head.safetensors"))
    v2 = load_file(str(part / "checkpoint-4" / "value_head.safetensors"))
    assert all(torch.equal(v1[k], v2[k]) for k in v1)


def test_rloo_runs_without_a_value_head(world, init_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("gpt2mm.rl.reward.Reward.__call__", answer_length_reward)
    out = tmp_path / "rloo"
    args = ppo_args(world, init_dir, out, "--train.algo", "rloo", "--rollout.samples_per_prompt", "2",
                    "--train.max_steps", "2", "--train.eval_every", "0")  # fmt: skip
    assert main(args) == 0
    assert not (out / "checkpoint-2" / "value_head.safetensors").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("vf_loss" not in r and math.isfinite(r["pg_loss"]) for r in rows)
    assert rows[0]["answers_sampled"] == 16  # 8 prompts x 2 answers


def test_ppo_into_an_earlier_runs_folder_is_refused(world, init_dir, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 3}\n')
    with pytest.raises(SystemExit) as e:
        main(ppo_args(world, init_dir, out))
    assert e.value.code == 2
    assert "holds an earlier run (checkpoint-3, metrics.jsonl)" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == '{"step": 3}\n' and (out / "checkpoint-3").is_dir()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model.init_from", "/nonexistent/ckpt"], "no gpt2mm checkpoint"),
        (["--train.algo", "rloo"], "samples_per_prompt >= 2"),
        (["--train.algo", "dpo"], "ppo, rloo or grpo"),
        (["--reward", "bleu"], "vqa or model:DIR"),
        (["--reward", "model:/nonexistent/rm"], "no reward model directory"),
        (["--train.max_steps", "0"], "train.max_steps must be at least 1"),
    ],
)
def test_bad_recipes_exit_2_with_a_message(world, init_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        main([*ppo_args(world, init_dir, tmp_path / "x"), *extra])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_the_vqa_reward_is_the_official_metric():
    from gpt2mm.data.samples import Sample, Turn
    from gpt2mm.eval.vqa_metric import vqa_accuracy
    from gpt2mm.rl.reward import Reward

    humans = ["red"] * 2 + ["dark red"] * 8
    samples = [Sample(id=str(i), image=None, turns=[Turn("user", "colour?"), Turn("assistant", "red")],
                      answers=humans) for i in range(4)]  # fmt: skip
    answers = ["red", "Dark red.", "blue", "a red"]
    got = Reward("0.5*vqa")(samples, answers)
    want = [0.5 * vqa_accuracy(a, humans) for a in answers]
    assert got.tolist() == pytest.approx(want) and want[0] == pytest.approx(0.5 * 0.6)


def test_a_reward_model_is_a_reward_alone_or_in_a_weighted_sum(world, init_dir, tmp_path):
    """`reward: model:DIR` is the reward model's P(correct) (RewardScorer), `0.5*vqa+0.5*model:DIR` the
    weighted sum; PPO runs with it."""
    from gpt2mm.data.vqa import load_vqa
    from gpt2mm.eval.vqa_metric import vqa_accuracy
    from gpt2mm.reward.model import RewardModel, RewardScorer
    from gpt2mm.rl.reward import Reward

    torch.manual_seed(0)
    rm = RewardModel.from_base(init_dir)
    torch.nn.init.normal_(rm.head.weight, std=0.3)  # a head that says something
    rm.save_pretrained(tmp_path / "rm")
    samples, _ = load_vqa(
        world / "val_questions.json", world / "val_annotations.json", world / "images" / "val"
    )
    samples = samples[:6]
    answers = [s.answers[0] if i % 2 else "purple" for i, s in enumerate(samples)]
    p = RewardScorer(tmp_path / "rm")([s.image for s in samples], [s.turns[0].text for s in samples], answers)
    assert len(set(round(x, 6) for x in p)) > 1 and all(0 < x < 1 for x in p)
    got = Reward(f"0.5*vqa+0.5*model:{tmp_path / 'rm'}")(samples, answers)
    want = [0.5 * vqa_accuracy(a, s.answers) + 0.5 * q for s, a, q in zip(samples, answers, p)]
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    out = tmp_path / "ppo"
    args = ppo_args(world, init_dir, out, "--reward", f"model:{tmp_path / 'rm'}", "--train.max_steps", "1",
                    "--train.eval_every", "0")  # fmt: skip
    assert main(args) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < row["reward"] < 1  # a probability, not a VQA score of a random model's answers (0)


def test_ppo_reads_the_frozen_vision_feature_cache(world, init_dir, tmp_path, monkeypatch):
    """With `data.feature_cache` (stage 1's cache of the frozen tower's outputs) the rollouts and the
    evaluation read cached vision states and give what the pixels give."""
    monkeypatch.setattr("gpt2mm.rl.reward.Reward.__call__", answer_length_reward)
    runs = {}
    for name, extra in (("pixels", []), ("cache", ["--data.feature_cache", str(tmp_path / "features")])):
        out = tmp_path / name
        torch.manual_seed(0)
        assert (
            main(ppo_args(world, init_dir, out, "--train.max_steps", "1", "--train.eval_every", "1", *extra))
            == 0
        )
        runs[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert (tmp_path / "features").is_dir() and any((tmp_path / "features").iterdir())
    # float16 cache rows: the same answers sampled, so the same rewards and validation accuracy
    for a, b in zip(runs["pixels"], runs["cache"]):
        for key in ("reward", "val_accuracy", "answer_length"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-6), key


# --- other data formats: the seed's CSV, Hugging Face data files ----------------------------------------------


@pytest.fixture(scope="module")
def sources(world, tmp_path_factory) -> Path:
    """The world's questions as the seed's CSVs (train.csv with one bad line, val.csv) and as parquet files
    (hf/train-*.parquet, hf/validation-*.parquet: image path, question, answer, the 10 human answers)."""
    import csv

    datasets = pytest.importorskip("datasets")
    from gpt2mm.data.vqa import load_vqa

    root = tmp_path_factory.mktemp("sources")
    (root / "hf").mkdir()
    for split, name in (("train", "train"), ("val", "validation")):
        samples, _ = load_vqa(
            *(world / f"{split}_{k}.json" for k in ("questions", "annotations")), world / "images" / split
        )
        samples = samples[:24]
        rows = [(s.image, f"Q: {s.turns[0].text} A: {s.turns[1].text}") for s in samples]
        if split == "train":
            rows.insert(2, (samples[0].image, "a caption, not a question"))  # line 3
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
        columns = {"image": [s.image for s in samples], "question": [s.turns[0].text for s in samples]}
        columns |= {"answer": [s.turns[1].text for s in samples], "answers": [s.answers for s in samples]}
        datasets.Dataset.from_dict(columns).to_parquet(str(root / "hf" / f"{name}-00000-of-00001.parquet"))
    return root


SOURCE_ARGS = {
    "csv": ["--data.format", "csv"],
    "hf": ["--data.format", "hf", "--data.hf_dataset", "hf", "--data.hf_streaming", "true"],
}


@pytest.mark.parametrize("fmt", ["csv", "hf"])
def test_ppo_trains_on_a_csv_or_hugging_face_data_files(
    sources, init_dir, tmp_path, capsys, monkeypatch, fmt
):
    """`gpt2mm ppo` with data.format csv or hf: a bad CSV line stops it in one line naming the line unless
    data.skip_bad, which counts it in the printed load report; a few updates write a checkpoint and evaluate
    on the validation split."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    out = tmp_path / fmt
    args = ppo_args(sources, init_dir, out, *SOURCE_ARGS[fmt], "--train.max_steps", "2")
    if fmt == "csv":
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.search(r"gpt2mm ppo: error: .*train\.csv: line 3: text 'a caption, not a question'", last)
        args += ["--data.skip_bad", "true"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    if fmt == "csv":
        assert "train.csv: 24 samples; skipped 1 record: 1 bad row" in printed
    else:
        assert f"train data: {sources / 'hf'}: 24 samples; nothing skipped" in printed
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward" in r] == [1, 2]
    assert [r["step"] for r in rows if "val_accuracy" in r] == [0, 2]


@pytest.mark.parametrize("fmt", ["csv", "hf"])
def test_the_reward_on_csv_and_hf_samples_is_evals_score(sources, init_dir, tmp_path, monkeypatch, fmt):
    """The `vqa` reward of a sample from a CSV (one answer) is normalized exact match, of a Hugging Face row
    with 10 human answers the official VQA accuracy; a rollout's scores are that of its answers."""
    from gpt2mm.eval.vqa_metric import exact_match, vqa_accuracy
    from gpt2mm.rl.config import PPORecipe
    from gpt2mm.rl.ppo import PPOTrainer
    from gpt2mm.rl.reward import Reward
    from gpt2mm.train.args import build

    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    data = {"root": str(sources), "format": fmt, "hf_dataset": "hf", "skip_bad": True}
    cfg = build(
        PPORecipe,
        {
            "model": {"init_from": str(init_dir)},
            "data": data,
            "rollout": {"prompts": 4},
            "train": {"output_dir": str(tmp_path / "out"), "eval_every": 0, "log_with": []},
        },
    )
    trainer = PPOTrainer(cfg, log=lambda m: None)
    samples = trainer.train_samples[:8]
    assert all(bool(s.answers) == (fmt == "hf") for s in samples)
    answers = [s.turns[1].text.upper() + "." if i % 2 else "purple" for i, s in enumerate(samples)]
    got = Reward("vqa")(samples, answers).tolist()
    if fmt == "csv":
        want = [exact_match(a, [s.turns[1].text]) for s, a in zip(samples, answers)]
    else:
        want = [vqa_accuracy(a, s.answers) for s, a in zip(samples, answers)]
    assert got == pytest.approx(want) and 0 < sum(want) < len(want)
    ro = trainer.rollout(samples[:4])
    assert ro.scores.tolist() == pytest.approx(Reward("vqa")(ro.samples, ro.answers).tolist())
