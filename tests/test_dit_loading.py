"""Loading the DiT from a factory-written model dir, and every loading error."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from stepvideo import StepVideoModel
from stepvideo.loading import CheckpointKeyError, CorruptCheckpointError
from stepvideo.testing.tiny import TINY, write_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dit_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("dit") / "model", variant="ti2v",
                                parts=["transformer", "scheduler"], dit_shards=3)


@pytest.fixture
def dit_copy(tiny_dit_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_dit_dir, dst)
    return dst / "transformer"


def _inputs(model, frames=3, h=4, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = TINY
    b = 2
    return dict(
        hidden_states=torch.randn(b, frames, d.z_channels, h, w, generator=g),
        timestep=torch.tensor([0.3, 0.7]),
        encoder_hidden_states=torch.randn(b, 12, d.llm_hidden, generator=g),
        encoder_hidden_states_2=torch.randn(b, 5, d.clip_hidden, generator=g),
        encoder_attention_mask=torch.cat([torch.ones(b, 5), torch.tensor([[1.0] * 9 + [0] * 3, [1.0] * 4 + [0] * 8])], 1),
        condition_hidden_states=torch.randn(b, frames, d.z_channels, h, w, generator=g),
        motion_score=5.0,
        return_dict=False,
    )


def test_sharded_load_matches_in_memory_model(tiny_dit_dir):
    folder = tiny_dit_dir / "transformer"
    shards = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) == 3
    loaded = StepVideoModel.from_pretrained(tiny_dit_dir, torch_dtype=torch.float32)
    assert loaded.use_additional_conditions and loaded.attention_type == "parallel"
    assert loaded.dtype == torch.float32 and not any(p.requires_grad for p in loaded.parameters())

    config = json.loads((folder / "config.json").read_text())
    reference = StepVideoModel.from_config(config)
    state = {}
    for shard in shards:
        state.update(load_file(str(shard)))
    reference.load_state_dict(state, strict=True)
    inputs = _inputs(reference)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs), reference(**inputs), rtol=0, atol=0)


def test_default_dtype_is_bf16_and_config_overrides(tiny_dit_dir):
    model = StepVideoModel.from_pretrained(tiny_dit_dir / "transformer", attention_type="torch")
    assert model.dtype == torch.bfloat16
    assert model.attention_type == "torch"
    with torch.no_grad():
        out = model(**_inputs(model))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_unknown_config_keys_are_ignored(dit_copy):
    cfg_path = dit_copy / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["some_future_option"] = {"x": 1}
    cfg_path.write_text(json.dumps(cfg))
    StepVideoModel.from_pretrained(dit_copy, torch_dtype="fp32")


def _rewrite_shard(path, edit):
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_unexpected_and_mismatched_reported_together(dit_copy):
    shards = sorted(dit_copy.glob("*.safetensors"))

    def edit_first(t):
        t.pop("scale_shift_table")
        t["not_a_parameter.weight"] = torch.zeros(3)

    def edit_last(t):
        key = next(k for k in t if k.endswith(".weight") and t[k].ndim == 2)
        t[key] = torch.zeros(7, 7)
    _rewrite_shard(shards[0], edit_first)
    _rewrite_shard(shards[-1], edit_last)
    with pytest.raises(CheckpointKeyError) as info:
        StepVideoModel.from_pretrained(dit_copy, torch_dtype="fp32")
    err = info.value
    assert err.missing == ["scale_shift_table"]
    assert err.unexpected == ["not_a_parameter.weight"]
    assert len(err.mismatched) == 1 and err.mismatched[0][1] == (7, 7)
    text = str(err)
    assert "scale_shift_table" in text and "not_a_parameter.weight" in text and "[7, 7]" in text


def test_git_lfs_pointer_is_detected(dit_copy):
    shard = sorted(dit_copy.glob("*.safetensors"))[1]
    shard.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123456\n")
    with pytest.raises(CorruptCheckpointError, match="git-lfs pointer"):
        StepVideoModel.from_pretrained(dit_copy)


def test_truncated_shard_is_detected(dit_copy):
    shard = sorted(dit_copy.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        StepVideoModel.from_pretrained(dit_copy)


def test_missing_files(dit_copy, tmp_path):
    (dit_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        StepVideoModel.from_pretrained(dit_copy)
    with pytest.raises(FileNotFoundError, match="not found"):
        StepVideoModel.from_pretrained(tmp_path / "does-not-exist")


def test_index_naming_a_missing_shard(dit_copy):
    sorted(dit_copy.glob("*.safetensors"))[0].unlink()
    with pytest.raises(FileNotFoundError, match="shards that do not exist"):
        StepVideoModel.from_pretrained(dit_copy)


def test_single_file_checkpoint(tiny_dit_dir, tmp_path):
    model = StepVideoModel.from_pretrained(tiny_dit_dir, torch_dtype="fp32")
    folder = tmp_path / "transformer"
    folder.mkdir()
    shutil.copy(tiny_dit_dir / "transformer" / "config.json", folder / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    again = StepVideoModel.from_pretrained(folder, torch_dtype="fp32")
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def _run(code, env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_hub_repo_id_from_local_cache_and_offline_error(tiny_dit_dir, tmp_path):
    """A repo id resolves through huggingface_hub (here from a pre-filled cache, offline);
    an unknown repo id offline gives an error that says how to proceed."""
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-stepvideo" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_dit_dir, snapshot)
    (cache / "models--tiny-org--tiny-stepvideo" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-stepvideo" / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    ok = _run("from stepvideo import StepVideoModel as M; m = M.from_pretrained('tiny-org/tiny-stepvideo');"
              "print(m.num_layers)", env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(TINY.dit_layers)
    bad = _run("from stepvideo import StepVideoModel as M; M.from_pretrained('nobody-here/no-such-model')", env)
    assert bad.returncode != 0
    assert "could not download 'nobody-here/no-such-model'" in bad.stderr
    assert "local folder" in bad.stderr
