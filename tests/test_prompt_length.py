"""Long prompts: counted with the checkpoint's own tokenizers and reported in one line; what the
encoders read is unchanged (they still cut at 320 / 77 tokens, as the reference does)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stepvideo.config import get_preset
from stepvideo.text_encoders.prompt_length import HUNYUAN_CLIP_READS, STEP_LLM_READS, PromptLengthCounter
from stepvideo.text_encoders.tokenizer import Wrapped_StepChatTokenizer

REPO = Path(__file__).resolve().parents[1]
LONG = "一名宇航员在月球上发现一块石碑，上面印有“stepfun”字样，闪闪发光" * 25          # 900 characters
MAGIC = get_preset("t2v").pos_magic


@pytest.fixture(scope="module")
def counter(tiny_model_dir):
    return PromptLengthCounter.from_model_dir(tiny_model_dir)


def test_counts_are_what_the_encoders_see(counter, tiny_model_dir):
    assert (STEP_LLM_READS, HUNYUAN_CLIP_READS) == (320, 77)
    short = counter.count("一只猫", MAGIC)
    assert not short.truncated and short.step_llm < 320
    assert short.hunyuan_clip_prompt < 77          # CLIP may stop inside the magic text: not reported
    long = counter.count(LONG, MAGIC)
    assert long.truncated and long.step_llm > 320 and long.hunyuan_clip_prompt > 77
    # the count is the encoder's own tokenisation before its cut; the cut itself is unchanged
    wrapped = Wrapped_StepChatTokenizer(tiny_model_dir / "step_llm" / "step1_chat_tokenizer.model")
    ids = wrapped.encode(LONG + MAGIC)
    assert long.step_llm == len(ids) + 2
    row = wrapped([LONG + MAGIC], max_length=320)["input_ids"][0].tolist()
    assert row == [1] + ids[:318] + [2]
    line = long.warning()
    assert f"{long.step_llm} Step-LLM tokens (the Step-LLM reads 320)" in line
    assert f"{long.hunyuan_clip} HunyuanCLIP tokens (HunyuanCLIP reads 77)" in line and "\n" not in line
    assert long.to_dict()["truncated"] is True


def test_no_tokenizers_no_count(tmp_path):
    assert PromptLengthCounter.from_model_dir(tmp_path) is None           # a DiT-only folder, a Hub id


def test_server_job_status_carries_the_counts(counter):
    from stepvideo.parallel.state import ParallelConfig
    from stepvideo.job_server.config import ServerConfig
    from stepvideo.job_server.requests import ModelInfo, build_job

    model = ModelInfo(is_ti2v=False, num_heads=4, parallel=ParallelConfig(), world_size=1, prompt_length=counter)
    fields = {"prompt": LONG, "num_inference_steps": 2, "num_frames": 17, "height": 64, "width": 64}
    settings = build_job(fields, {}, model, ServerConfig()).settings()
    tokens = settings["prompt_tokens"]
    assert tokens["truncated"] is True and tokens["step_llm_reads"] == 320
    assert tokens["warning"] == counter.count(LONG, settings["pos_magic"]).warning()
    short = build_job({**fields, "prompt": "一只猫"}, {}, model, ServerConfig()).settings()["prompt_tokens"]
    assert short["truncated"] is False and "warning" not in short


def test_cli_warns_once_on_rank_zero(tiny_model_dir, tmp_path):
    """A 900-character Chinese prompt on 2 ranks: one warning line with both counts; it still runs."""
    from stepvideo.parallel.launch import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "run_parallel.py"), "--no_service", "--ulysses_degree", "2",
           "--model_dir", str(tiny_model_dir), "--prompt", LONG, "--num_frames", "17", "--height", "64",
           "--width", "64", "--infer_steps", "1", "--dtype", "fp32", "--output_path", str(tmp_path / "long.mp4")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if "longer than the text encoders read" in line]
    assert len(lines) == 1 and lines[0].startswith("[rank 0] WARNING"), res.stderr[-3000:]
    assert re.search(r"\d+ Step-LLM tokens \(the Step-LLM reads 320\) and \d+ HunyuanCLIP tokens "
                     r"\(HunyuanCLIP reads 77\)", lines[0])
    assert (tmp_path / "long.mp4").is_file()
