"""`gpt2mm convert-seed`: a checkpoint of the seed's module gives a model with the same outputs (batch 1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, CLIPVisionModel, GPT2LMHeadModel

from conftest import make_image
from gpt2mm import MultimodalGPT2ForConditionalGeneration
from gpt2mm.cli import main
from gpt2mm.convert_seed import map_seed_key


class SeedModel(nn.Module):
    """The seed's module, rebuilt from its description (not its code)."""

    def __init__(self, vision_dir, text_dir):
        super().__init__()
        self.vision_model = CLIPVisionModel.from_pretrained(vision_dir)
        self.text_model = GPT2LMHeadModel.from_pretrained(text_dir)
        self.text_model.resize_token_embeddings(self.text_model.config.vocab_size + 1)  # + <image>
        d = self.text_model.config.n_embd
        self.vision_projection = nn.Linear(self.vision_model.config.hidden_size, d)
        self.norm_layer = nn.LayerNorm(d)
        self.image_trans = nn.TransformerEncoderLayer(d_model=d, nhead=8)  # defaults; batch_first=False

    def forward(self, input_ids, pixel_values):
        feats = self.vision_model(pixel_values).last_hidden_state  # (1, T_img, 768)
        feats = self.image_trans(self.norm_layer(self.vision_projection(feats)))  # fed (B, T, d) as (S, N, E)
        embeds = self.text_model.transformer.wte(input_ids)
        n = feats.shape[1]
        embeds = torch.cat([embeds[:, :1], embeds[:, 1 : 1 + n] + feats, embeds[:, 1 + n :]], dim=1)
        return self.text_model(inputs_embeds=embeds).logits


def test_map_seed_keys():
    assert (
        map_seed_key("text_model.transformer.h.0.attn.c_attn.weight")
        == "language_model.h.0.attn.c_attn.weight"
    )
    assert (
        map_seed_key("vision_model.vision_model.encoder.layers.0.mlp.fc1.weight")
        == "vision_tower.encoder.layers.0.mlp.fc1.weight"
    )
    assert map_seed_key("image_trans.linear1.weight") == "projector.layers.0.linear1.weight"
    assert map_seed_key("text_model.lm_head.weight") is None
    with pytest.raises(KeyError):
        map_seed_key("something.else")


def test_converted_seed_matches_seed_module(backbone_dirs, tmp_path):
    vision_dir, text_dir = backbone_dirs
    torch.manual_seed(0)
    seed = SeedModel(vision_dir, text_dir).eval()
    state = seed.state_dict()
    # the seed ran transformers 4, whose CLIPVisionModel nested its weights under `vision_model.`
    state = {
        k.replace("vision_model.", "vision_model.vision_model.", 1) if k.startswith("vision_model.") else k: v
        for k, v in state.items()
    }
    torch.save(state, tmp_path / "seed.pth")

    out = tmp_path / "converted"
    assert (
        main(
            [
                "convert-seed",
                str(tmp_path / "seed.pth"),
                str(out),
                "--text",
                str(text_dir),
                "--vision",
                str(vision_dir),
            ]
        )
        == 0
    )
    model = MultimodalGPT2ForConditionalGeneration.from_pretrained(out).eval()
    assert AutoConfig.from_pretrained(out).projector_token_mixing is False
    image_id = model.config.image_token_id
    assert (
        image_id == GPT2LMHeadModel.from_pretrained(text_dir).config.vocab_size
    )  # first id after the base vocab

    n = model.config.num_image_tokens
    ids = torch.tensor(
        [[50] + [image_id] * n + [56, 73, 295, 331, 32, 258, 27]]
    )  # "Q" <image>*n "What color ...A:"
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, pixel_values=pixels).logits, seed(ids, pixels), rtol=1e-5, atol=1e-5
        )
    # token mixing matters: with it on, outputs differ (so the test above can fail)
    model.projector.token_mixing = True
    with torch.no_grad():
        assert not torch.allclose(
            model(input_ids=ids, pixel_values=pixels).logits, seed(ids, pixels), atol=1e-4
        )
    _ = make_image


def test_convert_seed_refuses_bad_files(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        main(["convert-seed", str(bad), str(tmp_path / "o")])
    assert e.value.code == 2 and "weights_only" in capsys.readouterr().err
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(SystemExit):
        main(["convert-seed", str(tmp_path / "other.pth"), str(tmp_path / "o")])
    assert "unexpected keys ['foo.weight']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert-seed", str(tmp_path / "missing.pth"), str(tmp_path / "o")])
    assert "no such file" in capsys.readouterr().err
