"""Every command in a fenced ``bash`` block of README.md and docs/*.md runs on the tiny model.

Commands are rewritten, never paraphrased: ``--model_dir`` points at the tiny T2V (or, with an
image or a ``ti2v`` path, TI2V) dir, ``--vae_url``/``--caption_url`` at one shared tiny service,
``torchrun --nproc_per_node N`` runs one rank (the Ulysses degree follows; several gloo ranks
are covered by tests/test_end_to_end.py and tests/test_faults.py; an image-to-video command
runs 2), output paths go to a temporary folder, ``t2v-eval`` becomes a one-prompt file, GPUs
become the CPU, and the tiny sampling flags are appended (image-to-video keeps its preset's 102
frames). Files of this repository that a command names (``assets/demo.png``, scripts) are used
as written and must exist. Identical commands after the rewrite run once. Then:

- a service command starts the service and waits for ``GET /ready``;
- a ``run_parallel.py --serve`` command starts the generation server in the background; the
  commands that talk to it (``127.0.0.1:8000``: curl, the client, the OpenAI SDK) then run in
  order in one bash session against its real address, and must succeed; the mp4s and thumbnails
  they download (``-o /tmp/...``, the SDK's ``write_to_file('/tmp/...')``) are read back;
- generation, evaluation and decode commands must exit 0 and write what they promise;
- other ``python`` scripts and modules must answer ``--help`` and know every flag the docs use;
- ``python -m stepvideo.quantize`` runs on the tiny dir and must write a complete fp8 folder; a later
  ``--model_dir`` / ``--fp8_dir`` naming its documented ``--out`` uses that folder;
  ``benchmark/bench_load.py`` runs for real and must print its comparison;
- ``pip`` (network), ``bash scripts/test.sh`` (this suite), ``bash scripts/demo.sh``
  (``tests/test_end_to_end.py::test_readme_main_job``), GPU-only scripts and ``curl`` against a
  server started by hand are skipped with the reason (``SKIPPED``);
- a command no rule knows fails the test: add a rule when you document a new command.

``python`` blocks of the files in ``PYTHON_DOCS`` run too, all blocks of a file as one script in
a temporary folder (``test_documented_python_runs``): Hub ids become the tiny dirs, ``height=``,
``width=``, ``num_frames=`` and ``num_inference_steps=`` the tiny values.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

from stepvideo.cli.demo import TINY_TI2V_ARGS

REPO = Path(__file__).resolve().parents[1]
MAX_RANKS = 1                # keeps this test fast; multi-rank runs are tested elsewhere
TI2V_RANKS = 2               # the README's image-to-video command: through the service on 2 ranks
TINY = ["--num_frames", "17", "--height", "64", "--width", "64", "--infer_steps", "2", "--dtype", "fp32"]
TINY_TI2V = TINY_TI2V_ARGS + ["--dtype", "fp32"]        # the preset's 102 frames, the demo image's aspect
REPO_DIRS = ("assets", "api", "benchmark", "scripts", "stepvideo", "docs", "tests")
SKIPPED = {("pip",): "installs packages from the network",
           ("bash", "scripts/test.sh"): "the test suite itself",
           ("bash", "scripts/demo.sh"): "runs in tests/test_end_to_end.py::test_readme_main_job",
           ("bash", "scripts/gpu_check.sh"): "needs a GPU",
           ("nvidia-smi",): "needs a GPU",
           ("curl",): "talks to a server started by hand; the HTTP routes are tested in tests/test_service*.py "
                      "and tests/test_server*.py"}
GENERATE = ("run_parallel.py", "stepvideo.cli.generate", "stepvideo-generate")
EVALUATE = ("benchmark/evaluation.py", "stepvideo.cli.evaluate", "stepvideo-eval")
SERVICE = ("api/call_remote_server.py", "stepvideo.cli.service", "stepvideo-service")
DECODE = ("stepvideo.decode", "stepvideo-decode")
QUANTIZE = ("stepvideo.quantize",)
BENCH_LOAD = ("benchmark/bench_load.py",)
PYTHON_DOCS = ("docs/diffusers.md",)
TINY_KWARGS = {"height": 64, "width": 64, "num_frames": 17, "num_inference_steps": 2}


REHEARSAL_TINY = ["--tiny", "--height", "32", "--width", "32", "--num_frames", "17", "--steps", "1"]


def _tiny_layout(flags: List[str]) -> bool:
    """A ``benchmark/rehearse.py`` command runs at the tiny size (its full-size figures are in
    docs/performance.md) when its layout splits the tiny DiT's 4 heads; others answer ``--help``."""
    values = _flag_values(flags)
    split = int(values.get("--ulysses_degree", values.get("--nproc", "1"))) * \
        int(values.get("--tensor_parallel_degree", "1"))
    return "--on_gpu" not in flags and 4 % split == 0


def documented_commands() -> List[Tuple[str, str]]:
    """``(source, command)`` for every command line of every fenced bash block."""
    found = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        fence, lines = None, []
        for line in doc.read_text(encoding="utf-8").splitlines():
            stripped = line.strip()
            if stripped.startswith("```"):
                if fence is None:
                    fence, lines = stripped[3:].strip().lower(), []
                    continue
                if fence in ("bash", "sh", "shell", "console"):
                    text = "\n".join(lines).replace("\\\n", " ")
                    for command in text.splitlines():
                        command = command.strip().removeprefix("$ ")
                        if command and not command.startswith("#"):
                            found.append((doc.relative_to(REPO).as_posix(), command))
                fence = None
                continue
            if fence is not None:
                lines.append(line)
    return found


def is_ti2v(argv: List[str]) -> bool:
    return "--first_image_path" in argv or any("ti2v" in a for a in argv)


def missing_repo_files(argv: List[str]) -> List[str]:
    """Arguments naming a file of this repository (``assets/demo.png``, ``benchmark/x.py``) that
    does not exist."""
    named = [a for a in argv if not a.startswith("-") and Path(a).suffix and a.split("/")[0] in REPO_DIRS]
    return [a for a in named if not (REPO / a).is_file()]


def _flag_values(argv: List[str]) -> Dict[str, str]:
    return {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}


class Rewriter:
    """Turns a documented command into one that runs here on the tiny model."""

    def __init__(self, tmp: Path, t2v: Path, ti2v: Path, service_url: str, latents: Path, prompts: Path):
        self.tmp, self.t2v, self.ti2v, self.url = tmp, t2v, ti2v, service_url
        self.latents, self.prompts = latents, prompts
        self.quantized: Dict[str, Path] = {}      # documented --out of stepvideo.quantize -> its tiny output

    def entry(self, argv: List[str]) -> Tuple[str, List[str], List[str], int]:
        """``(kind, [python, ..., script or -m module], flags, nproc)``; torchrun becomes
        ``python -m torch.distributed.run`` on a free loopback port."""
        nproc, max_ranks = 1, TI2V_RANKS if is_ti2v(argv) else MAX_RANKS
        if argv[0] == "torchrun":
            rest, launcher = argv[1:], []
            while rest and rest[0].startswith("--") and rest[0] not in ("-m",):
                name, value = rest[0], rest[1]
                if name == "--nproc_per_node":
                    nproc = min(int(value), max_ranks)
                    value = str(nproc)
                launcher += [name, value]
                rest = rest[2:]
            from stepvideo.parallel.launch import free_port

            head = [sys.executable, "-m", "torch.distributed.run", *launcher, "--master_addr", "127.0.0.1",
                    "--master_port", str(free_port())]
        elif argv[0] in ("python", "python3"):
            head, rest = [sys.executable], argv[1:]
        elif argv[0].startswith("stepvideo-"):
            module = {"stepvideo-generate": "stepvideo.cli.generate", "stepvideo-eval": "stepvideo.cli.evaluate",
                      "stepvideo-service": "stepvideo.cli.service", "stepvideo-demo": "stepvideo.cli.demo",
                      "stepvideo-decode": "stepvideo.decode", "stepvideo-tiny": "stepvideo.testing.tiny"}[argv[0]]
            return self._kind(module), [sys.executable, "-m", module], argv[1:], nproc
        else:
            return "unknown", argv, [], nproc
        if rest[:1] == ["-m"]:
            return self._kind(rest[1]), head + rest[:2], rest[2:], nproc
        return self._kind(rest[0]), head + [str(REPO / rest[0])], rest[1:], nproc

    @staticmethod
    def _kind(target: str) -> str:
        for kind, names in (("generate", GENERATE), ("evaluate", EVALUATE), ("service", SERVICE),
                            ("decode", DECODE), ("quantize", QUANTIZE),
                            ("bench_load", BENCH_LOAD)):
            if target in names:
                return kind
        return "python"

    def flags(self, kind: str, argv: List[str], nproc: int) -> List[str]:
        out, i = [], 0
        ti2v = is_ti2v(argv)
        while i < len(argv):
            arg = argv[i]
            value = argv[i + 1] if i + 1 < len(argv) else None
            if arg == "--model_dir":
                out += [arg, str(self.quantized.get(value) or (self.ti2v if ti2v else self.t2v))]
            elif arg == "--fp8_dir":
                out += [arg, str(self.quantized[value])]
            elif kind == "quantize" and arg == "--out":
                self.quantized[value] = self.tmp / "quantized" / Path(value).name
                out += [arg, str(self.quantized[value])]
            elif kind == "quantize" and not arg.startswith("-") and not out:
                out.append(str(self.ti2v if ti2v else self.t2v))        # MODEL_DIR
                i += 1
                continue
            elif arg in ("--vae_url", "--caption_url"):
                out += [arg, self.url]
            elif arg in ("--ulysses_degree", "--sp_degree"):
                out += [arg, str(nproc)]
            elif arg == "--device":
                out += [arg, "cpu"]
            elif arg == "--port":
                out += [arg, "0"]
            elif arg == "--state_dir":
                out += [arg, str(self.tmp / "server-state")]
            elif arg == "--save_path":
                out += [arg, str(self.tmp / "results")]
            elif arg == "--output_path":
                out += [arg, str(self.tmp / "results" / Path(value).name)]
            elif arg == "--prompts":
                out += [arg, str(self.prompts)]
            elif arg == "--prompt":
                out += [arg, "一只猫"]
            elif arg == "--shard":
                out += [arg, value.replace("$i", "0")]
            elif kind == "decode" and arg.endswith(".latents.safetensors"):
                out.append(str(self.latents))
                i += 1
                continue
            else:
                out.append(arg)
                i += 1
                continue
            i += 2
        if kind in ("generate", "evaluate") and "--gallery_only" not in out:
            out += TINY_TI2V if ti2v and kind == "generate" else TINY
        if kind == "service" and "--device" not in out:
            out += ["--device", "cpu"]
        return out


def _run(cmd: List[str], env, timeout=300, background=False):
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _start_service(cmd: List[str], env, token: str) -> None:
    """Start, wait for /ready (the port is printed in the first line), stop."""
    from stepvideo.cli.demo import process_exited, stop
    from stepvideo.caption_service.client import wait_ready

    proc = _run(cmd, env, background=True)
    try:
        first = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", first)
        assert match, first + (proc.stdout.read() if proc.poll() is not None else "")
        wait_ready(f"http://127.0.0.1:{match.group(1)}", token=token, timeout=180, abort=process_exited(proc))
    finally:
        stop(proc)


SERVER_ADDRESS = "127.0.0.1:8000"      # the generation server's address in docs/server.md


def _start_server(cmd: List[str], env) -> Tuple[subprocess.Popen, str]:
    """Start ``run_parallel.py --serve`` in the background; ``(process, host:port)`` once it listens."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        match = re.search(r"listening on http://(127\.0\.0\.1:\d+)", line)
        if match:
            return proc, match.group(1)
    proc.wait()
    raise AssertionError("the generation server did not start:\n" + "".join(seen[-40:]))


def _run_against_server(lines: List[str], address: str, tmp: Path, env) -> None:
    """The documented server commands, in order, in one bash session (``$ID`` carries over)."""
    script = "\n".join(["set -euo pipefail"] + [line.replace(SERVER_ADDRESS, address).replace("/tmp/", f"{tmp}/")
                                                 for line in lines])
    res = subprocess.run(["bash", "-c", script], env={**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"},
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, f"documented server commands failed:\n{script}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    from PIL import Image

    from stepvideo.io.video import read_mp4

    shown = "\n".join(lines)
    # the downloads are real files: mp4s from curl -o and the OpenAI SDK's write_to_file, thumbnails
    for written in set(re.findall(r"(?:-o |write_to_file\(')(/tmp/\S+?\.mp4)", shown)):
        assert len(read_mp4(tmp / Path(written).name)[0]) > 0, written
    for written in set(re.findall(r"-o (/tmp/\S+\.(?:jpg|webp))", shown)):
        with Image.open(tmp / Path(written).name) as image:
            assert image.format in ("JPEG", "WEBP") and min(image.size) > 0, written


def test_documented_commands_run(tiny_model_dir, tiny_ti2v_model_dir, tiny_service, tmp_path):
    import torch

    from stepvideo.config import OutputConfig, get_preset
    from stepvideo.io.video import read_mp4
    from stepvideo.vae.latents_file import run_metadata, save_latents

    url, token = tiny_service
    prompts = tmp_path / "t2v-eval.jsonl"
    prompts.write_text(json.dumps({"prompt": "一只猫", "category": "Animals"}, ensure_ascii=False) + "\n")
    latents = tmp_path / "saved" / "video.latents.safetensors"
    from stepvideo.testing.tiny import TINY as DIMS

    noise = torch.randn(1, 3, DIMS.z_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    save_latents(latents, noise, run_metadata("x", get_preset("t2v"), OutputConfig(),
                                              video_path=str(tmp_path / "saved" / "video.mp4"),
                                              decoder="service-uint8", model_dir=""))
    rewriter = Rewriter(tmp_path, tiny_model_dir, tiny_ti2v_model_dir, url, latents, prompts)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "STEPVIDEO_SERVICE_TOKEN": token}

    commands = documented_commands()
    assert any("--no_service" in c for _, c in commands), "the README's one-GPU command is not in a bash block"
    seen, ran, skipped, unknown, missing = set(), [], [], [], []
    helped: Dict[str, str] = {}
    server, server_lines = None, []          # (process, host:port); commands that talk to it
    try:
        for source, command in commands:
            if SERVER_ADDRESS in command:
                server_lines.append(command)
                continue
            argv = shlex.split(command, comments=True)
            argv = [a for a in argv if a != "&"]          # a background service runs in the foreground here
            while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
                argv = argv[1:]                     # CUDA_VISIBLE_DEVICES=... and the like
            missing += [f"{source}: `{command}` names {name}" for name in missing_repo_files(argv)]
            reason = next((why for prefix, why in SKIPPED.items() if tuple(argv[:len(prefix)]) == prefix), None)
            if reason:
                skipped.append((command, reason))
                continue
            kind, head, flags, nproc = rewriter.entry(argv)
            if kind == "unknown":
                unknown.append(f"{source}: {command}")
                continue
            if kind == "python" and head[-1].endswith("benchmark/rehearse.py") and _tiny_layout(flags):
                cmd = head + flags + REHEARSAL_TINY + ["--work_dir", str(tmp_path / "rehearsal")]
                res = _run(cmd, env, timeout=600)        # its own layout flags: no rank rewrite
                last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
                assert res.returncode == 0 and last.startswith("rehearsal: ok "), \
                    f"{source}: `{command}`\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
                ran.append(command)
                continue
            flags = rewriter.flags(kind, flags, nproc)
            cmd = head + flags
            key = (kind, head[-1], tuple(sorted(flags)))      # the same command after the rewrite runs once
            if key in seen:
                continue
            seen.add(key)
            if kind == "python":
                script = head[-1]
                if script not in helped:
                    res = _run(head + ["--help"], env, timeout=120)
                    assert res.returncode == 0, f"{source}: `{command}` --help failed:\n{res.stderr[-2000:]}"
                    helped[script] = res.stdout
                for flag in (a for a in flags if a.startswith("--")):
                    assert flag in helped[script], f"{source}: `{command}`: {flag} is not an option of {script}"
                ran.append(command)
                continue
            if kind == "quantize":
                res = _run(cmd, env)
                last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
                assert res.returncode == 0 and (Path(last) / "transformer" / "config.json").is_file(), \
                    f"{source}: `{command}`\n{res.stderr[-3000:]}"
                assert "quantization" in json.loads((Path(last) / "transformer" / "config.json").read_text())
                ran.append(command)
                continue
            if kind == "bench_load":
                res = _run(cmd, env)
                assert res.returncode == 0 and "fp8 folder loads" in res.stdout, \
                    f"{source}: `{command}`\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
                ran.append(command)
                continue
            if kind == "service":
                _start_service(cmd, env, token)
                ran.append(command)
                continue
            if kind == "generate" and "--serve" in cmd:
                assert server is None, f"{source}: a second generation server"
                server = _start_server(cmd, env)
                ran.append(command)
                continue
            res = _run(cmd, env)
            assert res.returncode == 0, f"{source}: `{command}`\nrewritten: {shlex.join(cmd)}\n{res.stderr[-3000:]}"
            last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
            if kind == "generate" or kind == "decode":
                assert last.endswith(".mp4") and Path(last).is_file(), f"{source}: `{command}`\n{res.stdout[-1000:]}"
                if kind == "generate" and is_ti2v(argv):          # the ti2v preset's 102 frames, read back
                    assert read_mp4(Path(last))[0].shape[0] == 102, f"{source}: `{command}`"
            elif "--gallery_only" in cmd:
                assert Path(last).name == "index.html" and Path(last).is_file(), res.stdout[-1000:]
            else:
                assert re.match(r"evaluation: \d+ done", last), res.stdout[-1000:]
            ran.append(command)
        if server_lines:
            assert server is not None, f"commands talk to {SERVER_ADDRESS}, but no documented --serve command started it"
            _run_against_server(server_lines, server[1], tmp_path, env)
            ran += server_lines
    finally:
        if server is not None:
            server[0].terminate()
            server[0].wait(timeout=120)
    assert not missing, "documented commands name files this repository lacks:\n" + "\n".join(missing)
    assert not unknown, "documented commands without a rule in this test:\n" + "\n".join(unknown)
    assert len(ran) >= 6, ran
    assert {why for _, why in skipped} <= set(SKIPPED.values())


def documented_python(doc: Path) -> str:
    """The ``python`` fenced blocks of ``doc``, in order, as one script."""
    blocks, fence, lines = [], None, []
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("```"):
            if fence is None:
                fence, lines = line.strip()[3:].strip().lower(), []
                continue
            if fence == "python":
                blocks.append("\n".join(lines))
            fence = None
            continue
        if fence is not None:
            lines.append(line)
    return "\n\n".join(blocks)


def test_documented_python_runs(tiny_model_dir, tiny_ti2v_model_dir, tmp_path):
    for name in PYTHON_DOCS:
        script = documented_python(REPO / name)
        assert script, f"{name} has no python block"
        script = script.replace('"stepfun-ai/stepvideo-ti2v"', repr(str(tiny_ti2v_model_dir)))
        script = script.replace('"stepfun-ai/stepvideo-t2v"', repr(str(tiny_model_dir)))
        for key, value in TINY_KWARGS.items():
            script = re.sub(rf"\b{key}=\d+", f"{key}={value}", script)
        res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, f"{name}: the python example failed:\n{script}\n{res.stderr[-3000:]}"
        written = [p.name for p in tmp_path.glob("*.mp4")]
        assert written, f"{name}: the example wrote no video"
        from stepvideo.io.video import read_mp4

        for path in tmp_path.glob("*.mp4"):
            assert read_mp4(path)[0].shape[0] == TINY_KWARGS["num_frames"], path
