"""Fault injection with real processes on CPU: each failure ends in one line, a known exit code,
and nothing lost or half-written.

Covered: a directory as the output, a wrong token, the VAE service killed mid-run (latents saved,
then ``python -m stepvideo.decode`` makes the same video), the evaluation stopping after N
service failures, a rank-0-only error and a truncated checkpoint on 2 gloo ranks, two
evaluation runs on one folder (lock), the torchrun launcher killed (its workers exit), xfuser
with tensor parallelism. The service's own faults (overload, bad JSON) are in
``tests/test_service_faults.py``.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stepvideo.cli.demo import process_exited, service_command, stop
from stepvideo.parallel.launch import free_port
from stepvideo.caption_service.client import wait_ready

REPO = Path(__file__).resolve().parents[1]
TINY = ["--num_frames", "17", "--height", "64", "--width", "64", "--infer_steps", "2", "--dtype", "fp32"]


def _env(token=None, **extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("STEPVIDEO_DEBUG", None)
    env.update(extra)
    if token is not None:
        env["STEPVIDEO_SERVICE_TOKEN"] = token
    return env


def _generate(*args, token=None, timeout=300):
    """``python run_parallel.py ...`` (one rank, no torchrun)."""
    return subprocess.run([sys.executable, str(REPO / "run_parallel.py"), *args], env=_env(token),
                          capture_output=True, text=True, timeout=timeout)


def _torchrun(script, *args, nproc=2, token=None, timeout=300, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(REPO / script), *args]
    if popen:
        return subprocess.Popen(cmd, env=_env(token), **popen)
    return subprocess.run(cmd, env=_env(token), capture_output=True, text=True, timeout=timeout)


def _error_lines(stderr: str):
    return [line for line in stderr.splitlines() if line.startswith("error")]


def _assert_one_line(res, pattern: str, code: int = 2):
    """Exit ``code``; exactly one ``error:`` line, matching ``pattern``; no traceback."""
    assert res.returncode == code, res.stderr[-3000:]
    errors = _error_lines(res.stderr)
    assert len(errors) == 1 and re.search(pattern, errors[0]), res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    return errors[0]


def _files(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


# ------------------------------------------------------------------------------------------
# one rank
# ------------------------------------------------------------------------------------------

def test_directory_as_output_fails_before_loading(tiny_model_dir, tmp_path):
    target = tmp_path / "videos"
    target.mkdir()
    start = time.monotonic()
    res = _generate("--no_service", "--model_dir", str(tiny_model_dir), "--prompt", "x", "--output_path",
                    str(target), *TINY)
    _assert_one_line(res, r"^error: --output_path .*videos' is a directory")
    assert time.monotonic() - start < 60
    assert _files(tmp_path) == []


def test_wrong_token_is_one_line(tiny_model_dir, tiny_service, tmp_path):
    url, _ = tiny_service
    res = _generate("--model_dir", str(tiny_model_dir), "--prompt", "x", "--caption_url", url, "--vae_url", url,
                    "--service_token", "not-the-token", "--save_path", str(tmp_path / "out"), *TINY)
    _assert_one_line(res, r"^error: --caption_url .*401.*invalid token")
    assert _files(tmp_path) == []


class KillingProxy:
    """TCP forwarder to a service; at the first request whose head starts with ``trigger`` it runs
    ``on_trigger`` (e.g. kills the service), then drops every connection and stops listening.
    With ``every=True`` it keeps listening and drops the connection of every such request (a
    service that crashes on each decode)."""

    def __init__(self, target_port: int, trigger: bytes = b"POST /vae-api", on_trigger=None, every: bool = False):
        self.target_port, self.trigger, self.on_trigger, self.every = target_port, trigger, on_trigger, every
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.triggered = threading.Event()
        self._sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self):
        while self.every or not self.triggered.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src, dst, inspect):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if inspect and data.startswith(self.trigger) and (self.every or not self.triggered.is_set()):
                    self.triggered.set()
                    if self.on_trigger is not None:
                        self.on_trigger()
                    if not self.every:
                        self.close()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        for s in [self.listener, *self._sockets]:
            try:
                s.close()
            except OSError:
                pass


def test_vae_service_killed_mid_run_keeps_latents_and_decode_recovers(tiny_model_dir, tiny_service, tmp_path):
    from stepvideo.io.video import read_mp4

    url, token = tiny_service
    port = free_port()
    vae = subprocess.Popen(service_command(tiny_model_dir, port, "cpu") + ["--no_caption", "--torch_threads", "1"],
                           env=_env(token), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}", token=token, timeout=180, abort=process_exited(vae))
        proxy = KillingProxy(port, on_trigger=lambda: (vae.kill(), vae.wait()))
        out = tmp_path / "out" / "moon.mp4"
        common = ["--model_dir", str(tiny_model_dir), "--prompt", "moon", "--seed", "5", "--caption_url", url, *TINY]
        res = _generate(*common, "--vae_url", proxy.url, "--decode_retries", "0", "--output_path", str(out),
                        token=token)
    finally:
        stop(vae)
    assert proxy.triggered.is_set() and vae.returncode is not None       # the service really died mid-run
    latents = out.parent / "moon.latents.safetensors"
    line = _assert_one_line(res, r"^error: .*VAE service.*the denoised latents are saved in")
    assert str(latents) in line and "python -m stepvideo.decode" in line
    assert _files(tmp_path / "out") == ["moon.latents.safetensors"]       # no mp4, nothing half-written

    recovered = subprocess.run([sys.executable, "-m", "stepvideo.decode", str(latents), "--vae_url", url],
                               env=_env(token), capture_output=True, text=True, timeout=300)
    assert recovered.returncode == 0, recovered.stderr[-3000:]
    assert Path(recovered.stdout.strip().splitlines()[-1]) == out and out.is_file()
    local = subprocess.run([sys.executable, "-m", "stepvideo.decode", str(latents), "--model_dir", str(tiny_model_dir),
                            "--device", "cpu", "-o", str(tmp_path / "local.mp4")], env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert local.returncode == 0 and read_mp4(tmp_path / "local.mp4")[0].shape == (17, 64, 64, 3), local.stderr[-3000:]

    reference = tmp_path / "ref.mp4"
    res = _generate(*common, "--vae_url", url, "--output_path", str(reference), token=token)
    assert res.returncode == 0, res.stderr[-3000:]
    (got, _), (want, _) = read_mp4(out), read_mp4(reference)
    assert got.shape == (17, 64, 64, 3) and (got == want).all()


def test_evaluation_stops_after_consecutive_service_failures(tiny_model_dir, tiny_service, tmp_path):
    from stepvideo.evaluation import manifest as mf

    url, token = tiny_service
    proxy = KillingProxy(int(url.rsplit(":", 1)[1]), every=True)      # every decode loses its connection
    prompts = tmp_path / "set.txt"
    prompts.write_text("one\ntwo\nthree\nfour\n")
    root = tmp_path / "eval"
    res = subprocess.run([sys.executable, str(REPO / "benchmark" / "evaluation.py"), "--model_dir",
                          str(tiny_model_dir), "--prompts", str(prompts), "--save_path", str(root), "--caption_url",
                          url, "--vae_url", proxy.url, "--max_service_failures", "2", "--decode_retries", "0",
                          "--no_gallery", *TINY], env=_env(token), capture_output=True, text=True, timeout=300)
    proxy.close()
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1].startswith("evaluation: 0 done, 0 skipped, 2 failed")
    assert re.search(r"^error: stopped after 2 consecutive items failed on the caption/VAE service.*2 item\(s\) "
                     r"not attempted", res.stderr, re.M), res.stderr[-3000:]
    records = mf.read_records(root / mf.MANIFEST)
    assert [r["status"] for r in records] == ["failed", "failed"]
    assert all("latents are saved" in r["error"] for r in records)
    assert len(list(root.rglob("*.latents.safetensors"))) == 2 and not list(root.rglob("*.mp4"))


# ------------------------------------------------------------------------------------------
# two gloo ranks
# ------------------------------------------------------------------------------------------

def _assert_every_rank(res, pattern: str, nproc: int = 2):
    """Every rank printed the same single error line, before anything else that says error;
    exit code 2 on every rank (as torchrun reports them); no traceback of ours, no gloo noise."""
    assert res.returncode != 0
    ours = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == nproc and len(set(ours)) == 1 and re.search(pattern, ours[0]), res.stderr[-4000:]
    first = next(line for line in res.stderr.splitlines() if re.search(r"error|Traceback", line, re.I))
    assert first == ours[0], res.stderr[-4000:]
    assert "Connection closed by peer" not in res.stderr and "SIGABRT" not in res.stderr
    assert re.search(r"exitcode\s*:\s*2\b", res.stderr), res.stderr[-4000:]


def test_rank0_only_error_reaches_every_rank(tmp_path):
    res = _torchrun("run_parallel.py", "--model_dir", str(tmp_path / "missing"), "--prompt", "x", "--no_service",
                    *TINY)
    _assert_every_rank(res, r"^error: --model_dir .*missing': no such folder")


def test_truncated_checkpoint_is_one_line_on_every_rank(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shard = sorted((broken / "transformer").glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    res = _torchrun("run_parallel.py", "--model_dir", str(broken), "--prompt", "x", "--no_service",
                    "--save_path", str(tmp_path / "out"), *TINY)
    _assert_every_rank(res, rf"^error: .*{re.escape(shard.name)}")
    assert not (tmp_path / "out").exists()


def _children(pid: int):
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append(int(stat.parent.name))
                todo.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_second_runner_refused_and_workers_exit_with_their_launcher(tiny_model_dir, tmp_path):
    from stepvideo.evaluation.runner import OutputLock

    prompts = tmp_path / "set.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(20)))
    root = tmp_path / "eval"
    args = ["--model_dir", str(tiny_model_dir), "--prompts", str(prompts), "--save_path", str(root), "--no_service",
            *TINY]
    log = open(tmp_path / "run.log", "w")
    launcher = _torchrun("benchmark/evaluation.py", *args, stdout=log, stderr=subprocess.STDOUT)
    lock_file = root / ".lock-manifest.jsonl"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and launcher.poll() is None and not (
                lock_file.exists() and lock_file.read_text()):
            time.sleep(0.2)
        assert lock_file.read_text().startswith("pid "), (tmp_path / "run.log").read_text()[-3000:]
        holder = lock_file.read_text().split()[1]

        second = subprocess.run([sys.executable, str(REPO / "benchmark" / "evaluation.py"), *args],
                                env=_env(), capture_output=True, text=True, timeout=120)
        line = _assert_one_line(second, r"^error: another evaluation run is writing to ")
        assert f"pid {holder} on {socket.gethostname()}" in line

        workers = _children(launcher.pid)
        assert workers
        os.kill(launcher.pid, signal.SIGKILL)             # the launcher dies without stopping its workers
        launcher.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers), (tmp_path / "run.log").read_text()[-3000:]
    finally:
        for pid in _children(launcher.pid) if launcher.poll() is None else []:
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
        log.close()
    assert "the torchrun launcher" in (tmp_path / "run.log").read_text()
    lock = OutputLock(root)                              # the lock went with its holder
    deadline = time.monotonic() + 20
    while True:
        try:
            lock.acquire()
            break
        except Exception:
            holders = [fd.parent.parent.name for fd in Path("/proc").glob("[0-9]*/fd/*")
                       if _readlink(fd).endswith(lock_file.name)]
            if time.monotonic() > deadline:
                raise AssertionError(f"lock still held by {holders}; workers {workers}")
            time.sleep(0.5)
    lock.release()


def _readlink(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------
# configuration faults (no process needed)
# ------------------------------------------------------------------------------------------

def test_xfuser_refuses_tensor_parallelism():
    from stepvideo.parallel.state import ParallelConfig

    with pytest.raises(ValueError, match="xfuser .* cannot be combined with tensor parallelism"):
        ParallelConfig(ulysses_degree=2, tensor_parallel_degree=2, sp_backend="xfuser")
    assert ParallelConfig(ulysses_degree=2, backend="xfuser").sp_backend == "xfuser"      # old keyword
    assert ParallelConfig(sp_backend="xfuser").backend == "xfuser"                       # old attribute


def test_image_with_t2v_checkpoint_names_both(tiny_model_dir, tmp_path):
    from PIL import Image

    image = tmp_path / "cat.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(image)
    res = _generate("--no_service", "--model_dir", str(tiny_model_dir), "--prompt", "x", "--first_image_path",
                    str(image), *TINY)
    _assert_one_line(res, r"first image was given .*text-to-video \(T2V\) checkpoint")
    (tmp_path / "bad.png").write_text("not an image")
    res = _generate("--no_service", "--model_dir", str(tiny_model_dir), "--prompt", "x", "--first_image_path",
                    str(tmp_path / "bad.png"), *TINY)
    _assert_one_line(res, r"^error: --first_image_path .*bad.png' cannot be read as an image")


def test_debug_shows_the_traceback(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "run_parallel.py"), "--no_service", "--model_dir",
                          str(tmp_path / "missing"), "--prompt", "x", *TINY],
                         env=_env(STEPVIDEO_DEBUG="1"), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: --model_dir")


def _fail_on_rank_1():
    """Worker for the test below: rank 1 alone raises; every rank reports what it got."""
    import torch.distributed as dist

    from stepvideo.parallel.agree import RankFailure, on_all, on_main
    from stepvideo.parallel.state import ParallelConfig, ParallelState

    state = ParallelState.from_env(ParallelConfig(ulysses_degree=2))

    def step():
        if dist.get_rank() == 1:
            raise FileNotFoundError("shard-00002.safetensors: no such file")
        return "loaded"

    seen = []
    try:
        on_all(state, step)
    except RankFailure as failure:
        seen.append((str(failure), failure.user_error))
    seen.append(on_main(state, lambda: "plan"))                 # the group is still usable afterwards
    return seen


def test_rank1_only_error_reaches_every_rank_on_gloo():
    from stepvideo.parallel.launch import run_on_cpu_ranks

    results = run_on_cpu_ranks(_fail_on_rank_1, world_size=2, timeout=120)
    assert results[0] == results[1] == [("rank 1: shard-00002.safetensors: no such file", True), "plan"]
