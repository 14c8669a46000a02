"""Package hygiene: cheap, side-effect-free import; public names; the tiny-model factory CLI."""
import json
import subprocess
import sys

import pytest

from stepvideo.testing.tiny import TINY, TinyDims, write_tiny_model_dir


def _python(code, **kw):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, **kw)


def test_import_has_no_side_effects():
    code = ("import os, sys; before = dict(os.environ); argv = list(sys.argv);"
            "import stepvideo;"
            "assert dict(os.environ) == before, 'environment changed';"
            "assert sys.argv == argv;"
            "heavy = [m for m in ('torch', 'flash_attn', 'xfuser', 'transformers') if m in sys.modules];"
            "print(','.join(heavy))")
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"import stepvideo pulled in {out.stdout.strip()}"


def test_public_names_resolve():
    import stepvideo
    from stepvideo import FlowMatchDiscreteScheduler, StepVideoModel
    assert StepVideoModel.__name__ == "StepVideoModel"
    assert FlowMatchDiscreteScheduler.__name__ == "FlowMatchDiscreteScheduler"
    assert "StepVideoModel" in dir(stepvideo)
    with pytest.raises(AttributeError):
        stepvideo.NotAThing


def test_tiny_dims_constraints():
    assert TINY.dit_heads % 4 == 0 and TINY.dit_head_dim == 128
    assert TINY.transformer_config("t2v")["caption_channels"] == [TINY.llm_hidden, TINY.clip_hidden]
    with pytest.raises(ValueError, match="divisible by 4"):
        TinyDims(dit_heads=6)
    with pytest.raises(ValueError, match="128"):
        TinyDims(dit_head_dim=64)


def test_factory_cli_writes_official_layout(tmp_path):
    out = tmp_path / "tiny"
    res = subprocess.run([sys.executable, "-m", "stepvideo.testing.tiny", str(out), "--variant", "ti2v",
                          "--parts", "transformer", "scheduler"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == str(out)
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    assert cfg["use_additional_conditions"] is True and cfg["in_channels"] == TINY.z_channels
    index = json.loads((out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["reverse"] is False
    # refuses to overwrite a non-empty folder, leaves no temporary folder behind
    again = subprocess.run([sys.executable, "-m", "stepvideo.testing.tiny", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "not empty" in again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_factory_is_deterministic(tmp_path):
    a = write_tiny_model_dir(tmp_path / "a", parts=["transformer"], seed=3)
    b = write_tiny_model_dir(tmp_path / "b", parts=["transformer"], seed=3)
    for shard in sorted((a / "transformer").glob("*.safetensors")):
        assert shard.read_bytes() == (b / "transformer" / shard.name).read_bytes()


def test_factory_rejects_unknown_variant(tmp_path):
    with pytest.raises(ValueError, match="variant"):
        write_tiny_model_dir(tmp_path / "x", variant="t2i")
    assert not (tmp_path / "x").exists()
