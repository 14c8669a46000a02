"""Shared test fixtures.

``shared_dir`` resolves the project's shared material (specs, golden vectors, data): by
default ``../shared`` next to the repository root, or the folder named by the environment
variable ``STEPVIDEO_SHARED_DIR``. Tests that need it are skipped, naming the path tried,
only when it is absent.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_ENV = "STEPVIDEO_SHARED_DIR"


def shared_path() -> Path:
    env = os.environ.get(SHARED_ENV)
    return Path(env).resolve() if env else (REPO_ROOT.parent / "shared").resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = shared_path()
    if not path.is_dir():
        pytest.skip(f"shared material not found at {path} (set {SHARED_ENV} to override)")
    return path


class Golden:
    """Access to ``<shared>/golden``: the manifest, the tensors of each case and the one weight
    loader (:meth:`weights`, :meth:`dit_model`) every golden test uses."""

    def __init__(self, root: Path):
        self.root = root
        self.manifest = json.loads((root / "manifest.json").read_text())
        self._cache = {}

    def case(self, name: str) -> dict:
        return self.manifest["cases"][name]

    def tensors(self, filename: str) -> dict:
        if filename not in self._cache:
            from safetensors.torch import load_file
            self._cache[filename] = load_file(str(self.root / filename))
        return self._cache[filename]

    def data(self, name: str) -> dict:
        return self.tensors(self.case(name)["file"])

    def weights(self, name: str) -> dict:
        """State dict of a case, under the upstream key names (later files override earlier)."""
        state = {}
        for f in self.case(name)["weights_files"]:
            state.update({k[len("weights."):]: v for k, v in self.tensors(f).items() if k.startswith("weights.")})
        return state

    def dit_model(self, name: str):
        """The case's ``StepVideoModel`` (its constructor kwargs) with the golden weights loaded
        strictly, in eval mode: the one golden DiT loader of the DiT and pipeline tests."""
        from stepvideo import StepVideoModel

        case = self.case(name)
        kwargs = case["constructor_kwargs"] if "constructor_kwargs" in case else case["constructor"]["transformer_kwargs"]
        model = StepVideoModel(**kwargs)
        model.load_state_dict(self.weights(name), strict=True)
        return model.eval()

    def tolerance(self, name: str) -> dict:
        tol = self.case(name)["tolerance"]
        return {"atol": tol["atol"], "rtol": tol["rtol"]}


@pytest.fixture(scope="session")
def golden(shared_dir) -> Golden:
    root = shared_dir / "golden"
    if not (root / "manifest.json").is_file():
        pytest.skip(f"golden vectors not found at {root}")
    return Golden(root)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Goldens were produced with 2 torch threads; keep results comparable and stable."""
    previous = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A complete tiny T2V model dir written once per session by the package's factory."""
    from stepvideo.testing.tiny import write_tiny_model_dir
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "t2v", variant="t2v", seed=0)


@pytest.fixture(scope="session")
def tiny_ti2v_model_dir(tmp_path_factory) -> Path:
    """A complete tiny TI2V model dir (same text encoders and VAE as the T2V one)."""
    from stepvideo.testing.tiny import write_tiny_model_dir
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "ti2v", variant="ti2v", seed=0)


@pytest.fixture(scope="session")
def tiny_service(tiny_model_dir):
    """One caption/VAE service for the session (``python -m stepvideo.cli.service`` on the tiny
    T2V dir, CPU, token ``tiny-token``): ``(url, token)``. Its parts equal the TI2V dir's."""
    import subprocess

    from stepvideo.cli.demo import process_exited, service_command, stop
    from stepvideo.parallel.launch import free_port
    from stepvideo.caption_service.client import wait_ready

    port, token = free_port(), "tiny-token"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEPVIDEO_SERVICE_TOKEN": token}
    proc = subprocess.Popen(service_command(tiny_model_dir, port, "cpu") + ["--torch_threads", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, token=token, timeout=180, abort=process_exited(proc))
        yield url, token
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def tiny_generation_server(tiny_model_dir, tiny_service, tmp_path_factory):
    """One generation server for the session (``run_parallel.py --serve`` under torchrun, 2 gloo
    ranks, tiny T2V, token ``server_launch.TOKEN``, ``--max_queue 4``): the OpenAI-SDK and the
    browser tests share it. A :class:`server_launch.GenerationServer`."""
    from server_launch import running_server

    with running_server(tiny_model_dir, tiny_service, tmp_path_factory.mktemp("generation-server"),
                        max_queue=4) as server:
        yield server


CHROMIUM = "/usr/bin/chromium"


@pytest.fixture()
def headless_chromium(tmp_path):
    """``run(*args, timeout=90) -> CompletedProcess``: Debian's headless Chromium with a private
    profile and no network chatter; the test is skipped, naming the reason, without it."""
    import subprocess

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (STEPVIDEO_INSTALL_BROWSER=1 bash scripts/test.sh installs Debian's "
                    "chromium and fonts-noto-cjk as root)")

    def run(*args: str, timeout: float = 90) -> "subprocess.CompletedProcess":
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, res.stderr[-2000:]
        return res

    return run
