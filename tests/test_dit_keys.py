"""The real 30B configs build on the meta device with exactly the reference's keys and shapes."""
import pytest
import torch

from stepvideo import StepVideoModel


def _reference_keys(shared_dir, name):
    rows = (shared_dir / "golden" / "keys" / name).read_text().strip().splitlines()
    return [(k, [int(x) for x in s.strip("[]").split(",") if x.strip()]) for k, s in (r.split("\t") for r in rows)]


@pytest.mark.parametrize("name,kwargs,params", [
    ("dit_t2v_full.tsv", {}, 29_342_478_400),
    ("dit_ti2v_full.tsv", {"use_additional_conditions": True}, 29_382_205_504),
])
def test_full_config_keys_on_meta(shared_dir, name, kwargs, params):
    with torch.device("meta"):
        model = StepVideoModel(**kwargs)
    assert all(p.is_meta for p in model.parameters())
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == _reference_keys(shared_dir, name)
    assert sum(p.numel() for p in model.parameters()) == params


def test_constructor_validation():
    meta = torch.device("meta")
    with meta, pytest.raises(ValueError, match="attention_type"):
        StepVideoModel(num_layers=1, attention_type="ring")
    with meta, pytest.raises(ValueError, match="attention_head_dim"):
        StepVideoModel(num_layers=1, attention_head_dim=64)
    with meta, pytest.raises(ValueError, match="unknown attention backend"):
        StepVideoModel(num_layers=1, num_attention_heads=1, caption_channels=[8, 8], attention_backend="xla")
