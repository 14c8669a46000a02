"""Quality tools on the tiny model: compare two runs, score a run, the lossless table, the VAE CLI.

Three small evaluation runs are generated once per module (in-process, ``--local``, fp32, 2 steps,
17 frames at 64x64): A and B with the same seeds, C with a different seed for item 001 only.
Every number here comes from random weights: it checks the code, not the quality of a model.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from stepvideo.cli.demo import TINY_ARGS

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ROWS = [{"id": "001", "prompt": "一只猫在草地上奔跑", "category": "Animals", "seed": 1},
        {"id": "002", "prompt": "城市夜景，车流", "category": "Scenery", "seed": 2},
        {"id": "003", "prompt": "一碗面条", "category": "Food", "seed": 3}]


def script(name: str):
    """``benchmark/<name>.py`` as a module (its ``main(argv)`` runs in this process)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmark" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_set(path: Path, seed_delta: int = 0) -> Path:
    rows = [{**r, "seed": r["seed"] + seed_delta} for r in ROWS]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """``{"a": root, "b": root, "c": root}``: A and B identical settings, C another seed for 001."""
    base = tmp_path_factory.mktemp("quality_runs")
    evaluation = script("evaluation")
    common = ["--model_dir", str(tiny_model_dir), "--local", "--dtype", "fp32", *TINY_ARGS, "--save_latents"]
    roots = {}
    for name, delta, extra in (("a", 0, ["--categories", "animals", "SCENERY"]),
                               ("b", 0, ["--categories", "Animals", "Scenery"]),
                               ("c", 10, ["--ids", "001"])):
        roots[name] = base / f"run_{name}"
        argv = common + ["--prompts", str(_write_set(base / f"set_{name}.jsonl", delta)),
                         "--save_path", str(roots[name]), *extra]
        assert evaluation.main(argv) == 0, name
    return roots


def _records(root: Path):
    from stepvideo.evaluation import manifest as mf

    return {r["id"]: r for r in mf.read_records(root / mf.MANIFEST)}


def _chromium_dom(page: Path, tmp_path: Path) -> str:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (scripts/test.sh installs Debian's chromium when run as root)")
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=90)
    assert dom.returncode == 0, dom.stderr[-2000:]
    return dom.stdout


def test_runner_categories_and_latents(runs):
    from stepvideo.vae.latents_file import load_latents

    records = _records(runs["a"])
    assert sorted(records) == ["001", "002"]                       # Food filtered out by --categories
    for r in records.values():
        latents, meta = load_latents(runs["a"] / r["latents"])
        assert r["latents"] == r["path"][:-len(".mp4")] + ".latents.safetensors"
        assert list(latents.shape) == [1, 3, 8, 4, 4] and meta["sampling"]["seed"] == r["seed"]
    from stepvideo.evaluation.sets import EvalItem, select_items

    items = [EvalItem(index=i, id=f"{i:03d}", category=c, prompt="p") for i, c in
             enumerate(["Sports", "3D Animation", "Combination Concepts"], start=1)]
    assert [i.id for i in select_items(items, categories=["3d_animation", "combination-concepts"])] == ["002", "003"]
    with pytest.raises(ValueError, match="unknown category 'Music'.*'Sports'"):
        select_items(items, categories=["Music"])


def test_compare_identical_and_different_runs(runs, tmp_path, capsys):
    compare = script("compare")
    same, diff = tmp_path / "same", tmp_path / "diff"
    assert compare.main([str(runs["a"]), str(runs["b"]), "--out", str(same), "--device", "cpu"]) == 0
    text = (same / "report.json").read_text(encoding="utf-8")
    assert '"psnr": Infinity' in text
    report = json.loads(text)
    assert [i["id"] for i in report["items"]] == ["001", "002"]
    for item in report["items"]:
        assert item["identical"] is True and math.isinf(item["psnr"]) and item["ssim"] == pytest.approx(1.0)
        assert item["max_abs_diff"] == 0 and item["latents_rel_l2"] == 0.0
    assert report["overall"]["identical"] == 2 and set(report["categories"]) == {"Animals", "Scenery"}
    assert "overall   2      2          inf" in capsys.readouterr().out

    assert compare.main([str(runs["a"]), str(runs["c"]), "--out", str(diff), "--worst", "4"]) == 0
    report = json.loads((diff / "report.json").read_text(encoding="utf-8"))
    (item,) = report["items"]
    assert item["id"] == "001" and item["identical"] is False and item["seed_b"] == 11
    assert 0 < item["psnr"] < 40 and item["ssim"] < 0.99 and item["max_abs_diff"] > 0
    assert item["latents_rel_l2"] > 0.1 and len(item["frame_psnr"]) == 17
    assert report["only_in_a"] == ["002"] and report["overall"]["identical"] == 0
    heatmap = diff / item["heatmap"]["path"]
    from PIL import Image

    with Image.open(heatmap) as im:
        assert im.height == 3 * 96 and im.width >= 96 * 8     # rows: A, B, |A - B|; 8 frames
    page = diff / "index.html"
    links = re.findall(r'(?:src|href)="([^"]+)"', page.read_text(encoding="utf-8"))
    assert links and all((diff / link).resolve().is_file() for link in links)
    dom = _chromium_dom(page, tmp_path)
    assert dom.count('class="entry"') == 1 and dom.count("<video") == 2
    assert 'class="heatmap"' in dom and "identical: no" in dom and "not in both runs" in dom


def test_scores_with_tiny_chinese_clip(runs, tmp_path):
    import numpy as np
    import torch
    from transformers import ChineseCLIPImageProcessor

    from stepvideo.quality.scores import ImagePreprocess, motion_score
    from stepvideo.quality.tiny_clip import write_tiny_chinese_clip

    clip = write_tiny_chinese_clip(tmp_path / "tiny_clip")
    run = tmp_path / "run"
    shutil.copytree(runs["a"], run)
    assert script("score").main([str(run), "--clip_model", str(clip), "--device", "cpu"]) == 0
    records = _records(run)
    for r in records.values():
        s = r["scores"]
        assert -1 <= s["alignment"] <= 1 and -1 <= s["temporal_consistency"] <= 1 and s["motion"] > 0
        assert s["scorer"]["model"] == str(clip)
    summary = json.loads((run / "scores.json").read_text(encoding="utf-8"))
    assert set(summary["categories"]) == {"Animals", "Scenery", "overall"}
    assert summary["categories"]["Animals"]["motion"] == pytest.approx(records["001"]["scores"]["motion"])

    # the gallery shows the scores and the per-category means
    assert script("evaluation").main(["--save_path", str(run), "--gallery_only"]) == 0
    dom = _chromium_dom(run / "index.html", tmp_path)
    assert dom.count('class="scores category-means"') == 2 and dom.count("alignment ") >= 4

    # torch preprocessing follows the processor (resampling differs slightly); motion of a still video is 0
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 48, 80, 3), dtype=np.uint8))
    ours = ImagePreprocess.from_dir(clip, 32)(frames)
    theirs = ChineseCLIPImageProcessor.from_pretrained(str(clip))(list(frames.numpy()), return_tensors="pt")
    assert ours.shape == theirs["pixel_values"].shape
    assert (ours - theirs["pixel_values"]).abs().mean() < 0.15
    assert motion_score(frames[:1].repeat(3, 1, 1, 1)) == 0.0


def test_lossless_table_fp32(tiny_model_dir, tmp_path, capsys):
    table = tmp_path / "table.json"
    argv = ["--model_dir", str(tiny_model_dir), "--local", "--dtype", "fp32", *TINY_ARGS,
            "--options", "offload", "fp8", "sp2", "--json", str(table)]
    assert script("lossless").main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:5] == ["option", "seconds", "peak_mem_gib", "psnr", "max|diff|"]
    rows = {r["option"]: r for r in json.loads(table.read_text())["rows"]}
    assert list(rows) == ["baseline", "offload", "fp8", "sp2"]
    for exact in ("offload", "sp2"):                  # same arithmetic in fp32: bit-identical
        assert rows[exact]["identical"] is True and math.isinf(rows[exact]["psnr"]), rows[exact]
        assert rows[exact]["latents_rel_l2"] == 0.0
    assert rows["fp8"]["identical"] is False and 10 < rows["fp8"]["psnr"] < math.inf
    with pytest.raises(SystemExit):
        script("lossless").main(["--options"])


def _vae_cli(*args):
    from stepvideo.cli.vae import main
    return main([str(a) for a in args])


def test_vae_cli_round_trip(tiny_model_dir, runs, tmp_path, capsys):
    import numpy as np
    import torch

    from stepvideo.io.video import read_mp4, write_mp4
    from stepvideo.models.vae import AutoencoderKL
    from stepvideo.vae.codec import decode_latents, encode_video, frames_to_video
    from stepvideo.vae.latents_file import load_latents

    # chunked decode (3 latents at a time, seams blended after) == one whole decode
    vae = AutoencoderKL.from_pretrained(tiny_model_dir, dtype="fp32")
    z = torch.randn(1, 4, 8, 2, 2, generator=torch.Generator().manual_seed(0))      # chunks of 3 + 1: one seam
    assert torch.equal(decode_latents(vae, z), vae.decode(z))
    video = torch.rand(1, 18, 3, 16, 16) * 2 - 1                                     # chunks of 17 + 1
    assert torch.equal(encode_video(vae, video), vae.encode(video.to(torch.bfloat16), mode="mean").float())

    source = runs["a"] / _records(runs["a"])["001"]["path"]
    latents_file, decoded, rebuilt = tmp_path / "z.safetensors", tmp_path / "dec.mp4", tmp_path / "rec.mp4"
    assert _vae_cli("encode", source, "-o", latents_file, "--model_dir", tiny_model_dir) == 0
    z, meta = load_latents(latents_file)
    assert list(z.shape) == [1, 3, 8, 4, 4] and meta["frames"] == 17
    assert _vae_cli("decode", latents_file, "-o", decoded, "--model_dir", tiny_model_dir) == 0
    assert read_mp4(decoded)[0].shape == (17, 64, 64, 3)
    assert _vae_cli("reconstruct", source, "-o", rebuilt, "--model_dir", tiny_model_dir) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("reconstruction:")][0]
    assert re.match(r"reconstruction: psnr \d+\.\d+ dB, ssim -?\d\.\d{4}", line), line

    # 20 frames do not fit the 17-frame chunks: refused clearly, or padded and trimmed back
    odd = write_mp4(tmp_path / "odd.mp4", np.zeros((20, 64, 48, 3), np.uint8), denoise=False)
    capsys.readouterr()
    assert _vae_cli("encode", odd, "-o", tmp_path / "odd.safetensors", "--model_dir", tiny_model_dir) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the video has 20 frames") and "--frames pad" in err and err.count("\n") == 1
    assert not (tmp_path / "odd.safetensors").exists()
    assert _vae_cli("reconstruct", odd, "-o", tmp_path / "odd_rec.mp4", "--model_dir", tiny_model_dir,
                    "--frames", "pad", "--dtype", "fp32") == 0
    assert read_mp4(tmp_path / "odd_rec.mp4")[0].shape == (20, 64, 48, 3)
    assert _vae_cli("decode", tmp_path / "missing.safetensors", "-o", tmp_path / "x.mp4", "--model_dir",
                    tiny_model_dir) == 2
    assert "input not found" in capsys.readouterr().err
    assert frames_to_video(np.full((1, 16, 16, 3), 255, np.uint8)).max() == 1.0


def test_vae_cli_through_the_service(tiny_model_dir, tiny_service, runs, tmp_path):
    """The same commands with --vae_url: chunked requests give the local numbers."""
    from stepvideo.io.video import read_mp4
    from stepvideo.vae.latents_file import load_latents

    url, token = tiny_service
    source = runs["a"] / _records(runs["a"])["002"]["path"]
    for where, flag in (("remote", ["--vae_url", url, "--service_token", token]),
                        ("local", ["--model_dir", tiny_model_dir])):
        assert _vae_cli("encode", source, "-o", tmp_path / f"{where}.safetensors", *flag) == 0
        # both decode the runner's latents of item 002
        assert _vae_cli("decode", runs["a"] / _records(runs["a"])["002"]["latents"], "-o",
                        tmp_path / f"{where}.mp4", *flag) == 0
    from stepvideo.quality.metrics import compare_videos, relative_l2

    # bf16 convolutions may block differently in the service process (threads): rounding-level differences
    z_remote, _ = load_latents(tmp_path / "remote.safetensors")
    z_local, _ = load_latents(tmp_path / "local.safetensors")
    assert z_remote.shape == z_local.shape and relative_l2(z_remote, z_local) < 0.05
    result = compare_videos(read_mp4(tmp_path / "remote.mp4")[0], read_mp4(tmp_path / "local.mp4")[0])
    assert result.psnr > 30, result.psnr


def test_latents_file_reads_every_layout_written(tmp_path):
    """One format: files of the current layout, the generator's former flat layout and the VAE
    tool's former layout all load with the prompt, sampling and output settings as objects."""
    import torch
    from safetensors.torch import save_file

    from stepvideo.config import OutputConfig, get_preset
    from stepvideo.vae.latents_file import (FORMAT, latents_path, load_latents, run_metadata, save_latents,
                                            video_path_for)

    z = torch.randn(1, 3, 8, 4, 4)
    sampling = get_preset("t2v")
    target = latents_path(tmp_path / "run" / "猫.mp4")
    assert target.name == "猫.latents.safetensors" and video_path_for(target) == tmp_path / "run" / "猫.mp4"
    save_latents(target, z, run_metadata("123", sampling, OutputConfig(), video_path="v.mp4"))
    flat = tmp_path / "flat.latents.safetensors"
    save_file({"latents": z}, str(flat), metadata={
        "format": FORMAT, "prompt": "123", "sampling": json.dumps(sampling.to_dict()),
        "output": json.dumps({"fps": 25, "crop_540p": True, "denoise_filter": True}), "video_path": "v.mp4",
        "decoder": "local", "model_dir": ""})
    nested = tmp_path / "nested.safetensors"
    save_file({"latents": z}, str(nested), metadata={"stepvideo": json.dumps({"prompt": "123",
                                                                               "sampling": sampling.to_dict()})})
    for path in (target, flat, nested):
        latents, meta = load_latents(path)
        assert torch.equal(latents, z), path
        assert meta["prompt"] == "123" and meta["sampling"] == sampling.to_dict(), (path, meta)
    for path in (target, flat):
        assert load_latents(path)[1]["output"] == {"fps": 25, "crop_540p": True, "denoise_filter": True}
