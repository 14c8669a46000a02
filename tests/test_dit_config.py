"""``stepvideo.config.DiTConfig``: the one description of the DiT, read from and written to
``transformer/config.json``, and what the model, the FLOP / memory models and the tiny factory
take from it."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from stepvideo.config import DiTConfig
from stepvideo.models.dit import StepVideoModel
from stepvideo.perf import flops, memory_model
from stepvideo.testing.tiny import TINY, TINY_DIT, write_tiny_model_dir

OFFICIAL_T2V = {   # the published transformer/config.json (spec Appendix B), with diffusers bookkeeping
    "_class_name": "StepVideoModel", "_diffusers_version": "0.31.0", "num_attention_heads": 48,
    "attention_head_dim": 128, "in_channels": 64, "out_channels": 64, "num_layers": 48, "dropout": 0.0,
    "patch_size": 1, "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-06,
    "use_additional_conditions": False, "caption_channels": [6144, 1024], "attention_type": "parallel",
}


def test_round_trip_through_config_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(OFFICIAL_T2V))
    config = DiTConfig.from_json(path)
    assert config == DiTConfig()                                  # defaults = the released model
    assert config.extra == {"_class_name": "StepVideoModel", "_diffusers_version": "0.31.0"}
    written = config.to_json(tmp_path / "out.json")
    assert json.loads(written.read_text()) == OFFICIAL_T2V         # every key back, same values
    assert list(json.loads(written.read_text())) == list(OFFICIAL_T2V)   # and the same order
    assert DiTConfig.from_json(written) == config
    assert (config.inner_dim, config.llm_channels, config.clip_channels) == (6144, 6144, 1024)


def test_unknown_keys_are_kept_and_named(caplog):
    with caplog.at_level(logging.WARNING, logger="stepvideo.config"):
        config = DiTConfig.from_dict({**OFFICIAL_T2V, "num_layer": 2})      # a typo of num_layers
    assert config.num_layers == 48 and config.extra["num_layer"] == 2
    assert "num_layer" in caplog.text and "_class_name" not in caplog.text
    with pytest.raises(ValueError, match="unknown DiTConfig field"):
        DiTConfig.from_dict({}, num_layer=2)


@pytest.mark.parametrize("changes, words", [
    ({"num_attention_heads": 0}, "num_attention_heads must be an int >= 1"),
    ({"num_layers": 1.5}, "num_layers must be an int >= 1"),
    ({"in_channels": True}, "in_channels must be an int >= 1"),
    ({"attention_head_dim": 64}, "attention_head_dim must be 128"),
    ({"patch_size": 2}, "patch_size must be 1"),
    ({"attention_type": "xformers"}, "attention_type must be one of"),
    ({"norm_eps": 0.0}, "norm_eps must be > 0"),
    ({"dropout": 1.0}, "dropout must be in [0, 1)"),
    ({"caption_channels": [6144, 1024, 7]}, "caption_channels must be"),
])
def test_each_rule_raises_one_clear_error(changes, words):
    with pytest.raises(ValueError) as info:
        DiTConfig(**changes)
    assert words in str(info.value)


def test_normalisation_and_file_errors(tmp_path):
    config = DiTConfig(out_channels=None, in_channels=16, caption_channels=[96, 48])
    assert config.out_channels == 16 and config.caption_channels == (96, 48)
    assert DiTConfig(caption_channels=4096).clip_channels is None
    (tmp_path / "bad.json").write_text(json.dumps({"num_attention_heads": -1}))
    with pytest.raises(ValueError, match=r"bad\.json: DiTConfig\.num_attention_heads"):
        DiTConfig.from_json(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="transformer config not found"):
        DiTConfig.from_json(tmp_path / "missing")


def test_model_keeps_the_reference_kwargs_and_exposes_its_config(tmp_path):
    kwargs = dict(num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16, num_layers=2,
                  caption_channels=[96, 48], use_additional_conditions=True, attention_type="torch")
    with torch.device("meta"):
        model = StepVideoModel(**kwargs)
        again = StepVideoModel.from_config(model.config)
    assert model.config == DiTConfig(**kwargs) == again.config
    assert model.pos_embed.proj.in_channels == 32                  # TI2V: latents + condition channels
    with pytest.raises(ValueError, match="attention_head_dim must be 128"):
        StepVideoModel(attention_head_dim=64)

    root = write_tiny_model_dir(tmp_path / "tiny", parts=["transformer"])
    loaded = StepVideoModel.from_pretrained(root, torch_dtype=torch.float32)
    assert loaded.config == DiTConfig.from_json(root) == TINY_DIT["t2v"]
    assert loaded.config.extra["_class_name"] == "StepVideoModel"
    assert StepVideoModel.from_config(loaded.config, attention_type="torch").attention_type == "torch"


def test_tiny_factory_and_cost_models_read_the_config():
    assert TINY_DIT["t2v"].num_attention_heads == TINY.dit_heads
    assert TINY_DIT["ti2v"].use_additional_conditions and not TINY_DIT["t2v"].use_additional_conditions
    assert TINY.transformer_config("ti2v") == TINY_DIT["ti2v"].to_dict()
    assert memory_model.ModelDims.from_config(DiTConfig()) == memory_model.ModelDims()
    assert flops.DiTShape.from_config(DiTConfig(), tokens=75888) == flops.DiTShape(tokens=75888)
    for variant, config in TINY_DIT.items():
        with torch.device("meta"):
            model = StepVideoModel.from_config(config)
        assert sum(p.numel() for p in model.parameters()) == \
            memory_model.total_params(memory_model.ModelDims.from_config(config)), variant
