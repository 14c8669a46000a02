"""benchmark/evaluation.py: prompt sets, sharding, crash-safe resume, the gallery.

The end-to-end test runs the real service (tiny model) and two torchrun ranks, kills the
whole runner process group with SIGKILL after the first finished item, reruns it and checks
that every item ends with exactly one ok manifest line and one intact video.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from stepvideo.cli.demo import TINY_ARGS, process_exited, stop
from stepvideo.parallel.launch import free_port
from stepvideo.caption_service.client import wait_ready
from stepvideo.evaluation import manifest as mf
from stepvideo.evaluation.sets import (T2V_EVAL_SHA256, fetch_t2v_eval, load_items, parse_shard, parse_t2v_eval,
                                       select_items, shard_items)

REPO = Path(__file__).resolve().parents[1]
CATEGORY_SIZES = {"Sports": 12, "Food": 11, "Scenery": 12, "Animals": 12, "Festivals": 11,
                  "Combination Concepts": 12, "Surreal": 11, "People": 12, "3D Animation": 12,
                  "Cinematography": 11, "Style": 12}
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture()
def http_dir(tmp_path):
    """A loopback HTTP server over a temporary folder: yields (folder, base_url)."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_t2v_eval_download_verify_and_categories(shared_dir, http_dir, tmp_path):
    source = shared_dir / "data" / "Step-Video-T2V-Eval"
    if not source.is_file():
        pytest.skip(f"{source} not found")
    folder, base = http_dir
    shutil.copy(source, folder / "Step-Video-T2V-Eval")
    cache = tmp_path / "cache"
    path = fetch_t2v_eval(cache, url=f"{base}/Step-Video-T2V-Eval")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == T2V_EVAL_SHA256
    items = parse_t2v_eval(path.read_text(encoding="utf-8"))
    assert len(items) == 128 and all(item.prompt for item in items)
    assert Counter(item.category for item in items) == CATEGORY_SIZES
    assert items[0].category == "Sports" and items[-1].category == "Style" and items[-1].id == "128"
    # a local copy gives the same items, and the cached file is reused without the network
    assert load_items(str(source), cache) == items
    assert fetch_t2v_eval(cache, url="http://127.0.0.1:9/unreachable") == path

    # a corrupted download is rejected and nothing is cached
    (folder / "bad").write_bytes(source.read_bytes()[:-10] + b"corrupted!")
    bad_cache = tmp_path / "bad_cache"
    with pytest.raises(ValueError, match="sha256"):
        fetch_t2v_eval(bad_cache, url=f"{base}/bad")
    assert not any(bad_cache.iterdir())
    with pytest.raises(RuntimeError, match="--prompts"):
        fetch_t2v_eval(tmp_path / "offline", url="http://127.0.0.1:9/unreachable", timeout=2)


def test_shards_cover_the_set_exactly(tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(f"prompt {i}" for i in range(11)) + "\n\n")
    items = load_items(str(tmp_path / "p.txt"), tmp_path)
    assert len(items) == 11 and {i.category for i in items} == {"default"}
    for n in (1, 2, 3):
        parts = [shard_items(items, i, n) for i in range(n)]
        ids = [item.id for part in parts for item in part]
        assert sorted(ids) == sorted(item.id for item in items) and len(ids) == len(set(ids))
    assert [i.index for i in shard_items(items, 1, 2)] == [2, 4, 6, 8, 10]
    assert parse_shard("1/2") == (1, 2)
    for bad in ("2/2", "x", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
    assert [i.id for i in select_items(items, ids=["003", "5"], shard=(0, 1))] == ["003", "005"]
    assert len(select_items(items, shard=(0, 2), limit=2)) == 2


def test_ti2v_tree(tmp_path):
    from PIL import Image

    for rel in ("ti2v_eval_real/H/001", "ti2v_eval_ani/S/002"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / f"{rel}.png")
        (tmp_path / f"{rel}.txt").write_text(f"prompt {rel}\n")
    (tmp_path / "ti2v_eval_ani/S/002.json").write_text('{"motion_score": 10}')
    items = load_items(str(tmp_path), tmp_path)
    assert [(i.category, i.motion_score) for i in items] == [("ti2v_eval_ani/S", 10.0), ("ti2v_eval_real/H", None)]
    assert all(Path(i.image).is_file() for i in items)


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "api" / "call_remote_server.py"), "--model_dir",
                             str(tiny_model_dir), "--port", str(port), "--device", "cpu"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, timeout=180, abort=process_exited(proc))
        yield url
    finally:
        stop(proc)


def _descendants(pid: int):
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_run(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group and those of its ranks (torchrun starts each rank in
    its own session), all at once, like a node failure."""
    groups = {proc.pid}
    for pid in _descendants(proc.pid):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _ok_lines(root: Path):
    return [r for r in mf.read_records(root / mf.MANIFEST)]


def test_end_to_end_kill_resume_and_gallery(tiny_model_dir, service, tmp_path):
    prompts = tmp_path / "set.jsonl"
    rows = [{"prompt": "一只猫在草地上奔跑", "category": "Animals", "seed": 1},
            {"prompt": "A dog <b>&amp; \"friends\"</b>", "category": "Animals", "seed": 2},
            {"prompt": "城市夜景，车流", "category": "Scenery", "seed": 3},
            {"prompt": "sunrise over the sea", "category": "Scenery", "seed": 4}]
    prompts.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    root = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "benchmark" / "evaluation.py"),
           "--model_dir", str(tiny_model_dir), "--vae_url", service, "--caption_url", service,
           "--prompts", str(prompts), "--save_path", str(root), "--dtype", "fp32", *TINY_ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None and not _ok_lines(root):
            time.sleep(0.2)
        assert _ok_lines(root), (tmp_path / "run1.log").read_text()[-3000:]
    finally:
        _kill_run(proc)
        log.close()
    first = _ok_lines(root)
    # simulate what a crash can leave: a temp file and a video without a manifest line
    item4 = root / "Scenery" / "004-sunrise_over_the_sea.mp4"
    (item4.parent / f".{item4.stem}.999.partial.mp4").parent.mkdir(parents=True, exist_ok=True)
    (item4.parent / f".{item4.stem}.999.partial.mp4").write_bytes(b"half a video")
    if not any(r["id"] == "004" for r in first):
        item4.write_bytes(b"truncated")

    rerun = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout[-4000:]
    assert f"{len(first)} skipped" in rerun.stdout.splitlines()[-1], rerun.stdout[-2000:]

    from stepvideo.io.video import read_mp4

    records = mf.read_records(root / mf.MANIFEST)
    assert sorted(r["id"] for r in records) == ["001", "002", "003", "004"]          # one line each
    assert all(r["status"] == "ok" and r["error"] is None for r in records)
    assert (root / mf.MANIFEST).read_text(encoding="utf-8").count("\n") == 4
    for r in records:
        video = root / r["path"]
        assert r["path"].split("/")[0] == r["category"]
        assert hashlib.sha256(video.read_bytes()).hexdigest() == r["sha256"]
        frames, _ = read_mp4(video)
        assert frames.shape == (17, 64, 64, 3)
        assert r["sampling"]["num_inference_steps"] == 2 and r["seed"] == int(r["id"])
        assert r["model_dir"] and "denoise_s" in r["timings"]
        assert r["prompt_tokens"]["truncated"] is False and r["prompt_tokens"]["step_llm_reads"] == 320
    leftovers = [p for p in root.rglob("*") if "partial" in p.name or p.name.endswith(".tmp")]
    assert not leftovers
    assert len(list(root.rglob("*.mp4"))) == 4

    # gallery: rebuilt from the manifest alone; every link resolves
    (root / "index.html").unlink()
    gallery = subprocess.run([sys.executable, str(REPO / "benchmark" / "evaluation.py"), "--save_path", str(root),
                              "--gallery_only"], env=env, capture_output=True, text=True, timeout=60)
    assert gallery.returncode == 0, gallery.stderr
    index = root / "index.html"
    page = index.read_text(encoding="utf-8")
    assert "&lt;b&gt;&amp;amp; &quot;friends&quot;&lt;/b&gt;" in page and "<b>&amp;" not in page
    import re
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert len(links) >= 4 * 3
    for link in links:
        assert (root / link.replace("&amp;", "&")).is_file(), link
    assert (root / "gallery" / "contact_sheet.png").is_file()

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: the gallery render test needs a headless Chromium "
                    "(STEPVIDEO_INSTALL_BROWSER=1 bash scripts/test.sh installs Debian's chromium as root)")
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", index.as_uri()],
                         capture_output=True, text=True, timeout=90)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('class="entry"') == 4
    assert dom.stdout.count("<video") == 4 and dom.stdout.count('class="category"') == 2


def test_other_shard_layout_keeps_its_videos(tmp_path):
    """An unsharded run's finished videos are adopted by a later ``--shard 0/2`` run, never deleted."""
    from stepvideo.evaluation.sets import EvalItem, sha256_file

    items = [EvalItem(index=i, id=f"{i:03d}", category="Cats", prompt=f"cat {i}") for i in (1, 2, 3)]
    records = []
    for item in items[:2]:                        # items 1 and 2 finished by the unsharded run
        video = tmp_path / mf.relative_video_path(item)
        video.parent.mkdir(parents=True, exist_ok=True)
        video.write_bytes(f"video {item.id}".encode())
        records.append({"id": item.id, "status": mf.STATUS_OK, "path": mf.relative_video_path(item),
                        "sha256": sha256_file(video)})
    for record in records:
        mf.append_record(tmp_path / mf.MANIFEST, record)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.mp4")}

    shard0 = [item for item in items if (item.index - 1) % 2 == 0]          # items 1 and 3
    todo, skipped = mf.prepare(tmp_path, shard0, shard=(0, 2))
    assert [i.id for i in todo] == ["003"] and skipped == ["001"]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.mp4")} == before   # nothing deleted or rewritten
    assert mf.read_records(tmp_path / mf.MANIFEST) == records                # the other manifest untouched


def test_one_runner_per_folder_and_shard(tmp_path):
    from stepvideo.errors import UserError
    from stepvideo.evaluation.runner import OutputLock

    first = OutputLock(tmp_path)
    first.acquire()
    try:
        held = rf"another evaluation run is writing to {tmp_path} \(pid {os.getpid()} on "
        with pytest.raises(UserError, match=held):
            OutputLock(tmp_path).acquire()
        other_shard = OutputLock(tmp_path, (1, 2))          # another shard of the same folder may run beside
        other_shard.acquire()
        other_shard.release()
    finally:
        first.release()
    again = OutputLock(tmp_path)
    again.acquire()
    again.release()
