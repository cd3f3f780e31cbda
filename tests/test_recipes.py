"""Recipes as files: `base:` inheritance, the general recipe that the demo's stage 1 extends with the shapes
world's extras only, and curricula from what every data set has."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gpt2mm.data.samples import Sample, Turn
from gpt2mm.errors import UsageError
from gpt2mm.train.args import load_config
from gpt2mm.train.config import DataConfig, SFTConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# What configs/demo-sft.yaml adds to configs/tiny-vqa.yaml: the shapes world, its conversations (with the loss
# averaged over answers, which their long descriptions call for) and where the demo writes.
WORLD_EXTRAS = {
    "data.root", "data.synth", "data.synth_args", "data.conversation_mix", "data.difficulty", "data.grounding",
    "train.output_dir", "train.max_minutes", "train.curriculum_steps", "train.loss_average", "train.centres_weight",
}  # fmt: skip


def _flat(cfg) -> dict:
    return {f"{s}.{k}": v for s, section in dataclasses.asdict(cfg).items() for k, v in section.items()}


def test_demo_stage1_is_the_general_recipe_plus_world_extras():
    general = _flat(load_config(SFTConfig, CONFIGS / "tiny-vqa.yaml", []))
    demo = _flat(load_config(SFTConfig, CONFIGS / "demo-sft.yaml", []))
    differ = {k for k in general if general[k] != demo[k]}
    assert differ == WORLD_EXTRAS
    assert (
        general["data.synth"] is False
        and general["data.difficulty"] is None
        and general["data.grounding"] is None
    )


def test_base_merges_sections_key_by_key(tmp_path):
    (tmp_path / "a.yaml").write_text("model: {preset: tiny, overrides: {vision_feature_layer: 0}}\n"
                                     "train: {lr: 0.002, batch_size: 8}\n")  # fmt: skip
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {batch_size: 4}\nmodel: {overrides: {}}\n")
    cfg = load_config(SFTConfig, tmp_path / "b.yaml", ["--train.max_steps", "7"])
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.max_steps) == (0.002, 4, 7)
    assert cfg.model.overrides == {}  # a mapping inside a section replaces the base's whole


def test_base_cycle_and_missing_base_are_one_line_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(UsageError, match="includes itself"):
        load_config(SFTConfig, tmp_path / "a.yaml", [])
    (tmp_path / "c.yaml").write_text("base: nope.yaml\n")
    with pytest.raises(UsageError, match="nope.yaml: no such recipe file"):
        load_config(SFTConfig, tmp_path / "c.yaml", [])


def test_length_difficulties_count_words_and_packing_keeps_the_hardest():
    from gpt2mm.data.splits import pack_by_image, set_difficulty

    def qa(q, a, image="x.png"):
        return Sample(id=q, image=image, turns=[Turn("user", q), Turn("assistant", a)])

    samples = [
        qa("what is it?", "a red ball"),
        qa("how many?", "two"),
        qa("is it big or small?", "big", "y.png"),
    ]
    set_difficulty(samples, DataConfig(difficulty="answer_length"), "train")
    assert [s.difficulty for s in samples] == [3, 1, 1]
    set_difficulty(samples, DataConfig(difficulty="question_length"), "train")
    assert [s.difficulty for s in samples] == [3, 2, 5]
    packed = {s.image: s.difficulty for s in pack_by_image(samples, 8, seed=0)}
    assert packed == {"x.png": 3, "y.png": 5}
    with pytest.raises(UsageError, match="data.difficulty must be one of"):
        set_difficulty(samples, DataConfig(difficulty="colour"), "train")
    with pytest.raises(UsageError, match="data.difficulty must be one of"):  # refused before any data loads
        load_config(SFTConfig, CONFIGS / "tiny-vqa.yaml", ["--data.difficulty", "length"])


def test_packing_leaves_conversations_as_they_are():
    """A LLaVA conversation mixed with VQA questions about its image (stage 3's data.vqa_mix) stays one
    sample; only the single question-answer samples are packed."""
    from gpt2mm.data.splits import pack_by_image

    conversation = Sample(
        id="c",
        image="x.png",
        turns=[
            Turn("user", "describe"),
            Turn("assistant", "a ball"),
            Turn("user", "color?"),
            Turn("assistant", "red"),
        ],
    )
    questions = [
        Sample(id=q, image="x.png", turns=[Turn("user", q), Turn("assistant", "a")]) for q in ("q1", "q2")
    ]
    packed = pack_by_image([questions[0], conversation, questions[1]], 8, seed=0)
    assert sorted(len(s.turns) for s in packed) == [4, 4]
    assert [s.turns for s in packed if s.id == "c"] == [conversation.turns]
    assert sorted(set(s.id.split("+")) for s in packed if s.id != "c") == [{"q1", "q2"}]


def test_bad_yaml_is_one_line_naming_where(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  lr: [1\n")
    with pytest.raises(UsageError) as e:
        load_config(SFTConfig, tmp_path / "bad.yaml", [])
    assert "\n" not in str(e.value) and "bad.yaml: not valid YAML at line" in str(e.value)


def test_unknown_model_override_is_a_one_line_error_naming_it():
    """`model.overrides` keys must be MultimodalGPT2Config fields: YAML's `{vision_stem:cnn}` (no space after
    the colon) is a key named "vision_stem:cnn", which would otherwise build the preset's default silently."""
    from gpt2mm.train.config import ModelConfig
    from gpt2mm.train.model import build_model_for_training

    with pytest.raises(UsageError, match=r"'vision_stem:cnn'.*space after the colon"):
        build_model_for_training(ModelConfig(preset="tiny", overrides={"vision_stem:cnn": None}))
    with pytest.raises(UsageError, match="'patch_sise'"):
        build_model_for_training(ModelConfig(preset="tiny", overrides={"patch_sise": 8}))
    model, _ = build_model_for_training(
        ModelConfig(preset="tiny", overrides={"vision_stem": "cnn", "vision_config": {"patch_size": 8}})
    )
    assert model.config.vision_stem == "cnn" and model.config.num_image_tokens == 37


def test_model_overrides_from_the_command_line_are_typed_as_the_recipe_file_types_them(tmp_path):
    """`--model.overrides.KEY VALUE` gives strings; they must reach the model as the same values a recipe
    file's YAML gives (`projector_num_layers: 2` is the number 2), nested sub-config entries too, and a value
    that does not fit its field is a one-line error naming it."""
    from gpt2mm.config import MultimodalGPT2Config
    from gpt2mm.train.model import build_model_for_training

    flags = [
        "--model.overrides.projector_num_layers", "2", "--model.overrides.text_embedding_std=1e-1",
        "--model.overrides.projector_norm_first", "true", "--model.overrides.vision_config.patch_size", "16",
    ]  # fmt: skip
    from_cli = load_config(SFTConfig, CONFIGS / "tiny-vqa.yaml", flags).model.overrides
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "base: " + str(CONFIGS / "tiny-vqa.yaml") + "\nmodel:\n  overrides:\n    vision_stem: cnn\n"
        "    vision_config: {patch_size: 16}\n    vision_feature_layer: 0\n    text_init: pytorch\n"
        "    text_final_norm: false\n    text_embedding_std: 0.1\n    projector_num_layers: 2\n"
        "    projector_norm_first: true\n    projector_coordinates: true\n    text_config: {n_layer: 6}\n"
    )
    from_file = load_config(SFTConfig, recipe, []).model.overrides
    assert from_cli == from_file
    built = MultimodalGPT2Config.from_preset("tiny", **from_cli)
    assert (built.projector_num_layers, built.text_embedding_std, built.vision_config.patch_size) == (
        2,
        0.1,
        16,
    )
    for flag, value, message in [
        ("projector_num_layers", "two", r"^model.overrides.projector_num_layers: expected int, got 'two'$"),
        ("vision_stem", "resnet", r"^model.overrides.vision_stem: 'resnet' is not one of"),
    ]:
        with pytest.raises(UsageError, match=message):
            load_config(SFTConfig, CONFIGS / "tiny-vqa.yaml", [f"--model.overrides.{flag}", value])
    for flag, value, message in [  # typed, but refused by the config itself
        ("vision_config.patch_size", "x", r"^model.overrides: .*'patch_size'"),
        ("projector_num_layers", "-1", r"^model.overrides: projector_num_layers must be >= 0, got -1$"),
    ]:
        model_cfg = load_config(
            SFTConfig, CONFIGS / "tiny-vqa.yaml", [f"--model.overrides.{flag}", value]
        ).model
        with pytest.raises(UsageError, match=message) as e:
            build_model_for_training(model_cfg)
        assert "\n" not in str(e.value)


def test_a_from_scratch_recipes_overrides_on_a_loaded_checkpoint_keep_it_or_name_what_differs():
    """A recipe continued from a checkpoint (`model.init_from`) inherits the overrides that built the model from
    scratch: the checkpoint's equal values stay, initialisation options are moot, a different architecture is
    a one-line error naming the entry, other options are set."""
    from gpt2mm.config import MultimodalGPT2Config
    from gpt2mm.train.model import apply_overrides_to_loaded

    recipe = load_config(SFTConfig, CONFIGS / "tiny-vqa.yaml", []).model.overrides
    loaded = MultimodalGPT2Config.from_preset("tiny", **recipe)
    before = loaded.to_dict()
    apply_overrides_to_loaded(loaded, recipe, "ckpt")
    assert loaded.to_dict() == before
    apply_overrides_to_loaded(loaded, {"vision_feature_layer": 2, "text_embedding_std": 1.0}, "ckpt")
    assert loaded.vision_feature_layer == 2 and loaded.text_embedding_std == before["text_embedding_std"]
    with pytest.raises(
        UsageError, match=r"model.overrides vision_config: patch_size differ\(s\) from the checkpoint ckpt"
    ):
        apply_overrides_to_loaded(loaded, {"vision_config": {"patch_size": 16}}, "ckpt")
    with pytest.raises(UsageError, match="vision_stem"):
        apply_overrides_to_loaded(loaded, {"vision_stem": "patch"}, "ckpt")
    # a checkpoint made before the recipe had the coordinates: its projector has no coord_embedding to use
    without = MultimodalGPT2Config.from_preset("tiny", **{**recipe, "projector_coordinates": False})
    with pytest.raises(
        UsageError,
        match=r"projector_coordinates: True differs from the checkpoint ckpt's False; .*projector_coordinates false\)",
    ):
        apply_overrides_to_loaded(without, recipe, "ckpt")
    with pytest.raises(UsageError, match="projector_num_layers"):
        apply_overrides_to_loaded(loaded, {"projector_num_layers": 2}, "ckpt")
