"""The caption/VAE service end to end: the real launcher (``api/call_remote_server.py``) runs as a
subprocess on 127.0.0.1 with the tiny model dir, and the clients are compared with the same
models run in this process (bit-exact, same dtype)."""
from __future__ import annotations

import http.server
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import save

from stepvideo.caption_service.client import (RemoteCaptionEncoder, RemoteVAE, ServiceConnectionError, ServiceError,
                                      wait_ready)
from stepvideo.caption_service.protocol import JSON_CONTENT_TYPE, TENSOR_CONTENT_TYPE, encode_json, encode_tensors
from stepvideo.parallel.launch import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "api" / "call_remote_server.py"
MAX_BODY_MB = 1
PROMPTS = ["a red fox jumps over a frozen river", "低质量、模糊"]


class ServerProcess:
    """``python api/call_remote_server.py`` on a free loopback port; output kept for failure reports."""

    def __init__(self, model_dir: Path, *extra: str, env: dict | None = None):
        cmd = [sys.executable, str(LAUNCHER), "--model_dir", str(model_dir), "--port", "0", "--device", "cpu",
               "--torch_threads", "2", "--max_body_mb", str(MAX_BODY_MB), "--log_level", "WARNING", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.url = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 60
        while self.url is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("service did not start:\n" + self.log())
            time.sleep(0.05)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.url is None and "listening on " in line:
                self.url = line.split("listening on ", 1)[1].split()[0].rstrip(",")

    def log(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, token=None) -> dict:
        def exited():
            code = self.proc.poll()
            return None if code is None else f"server exited with code {code}:\n{self.log()}"
        return wait_ready(self.url, token=token, timeout=90, interval=0.2, abort=exited)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    srv = ServerProcess(tiny_model_dir)
    try:
        srv.ready_info = srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    """The same models in this process (CPU, bf16 like the server default)."""
    from stepvideo.models.vae import AutoencoderKL
    from stepvideo.text_encoders.caption import CaptionEncoder

    return {"caption": CaptionEncoder.from_pretrained(tiny_model_dir),
            "vae": AutoencoderKL.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)}


def _latents(seed: int, frames: int = 3, size: int = 2) -> torch.Tensor:
    return torch.randn(1, frames, 8, size, size, generator=torch.Generator().manual_seed(seed))


def _video(seed: int) -> torch.Tensor:
    return torch.rand(1, 17, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_same(got: torch.Tensor, want: torch.Tensor):
    assert got.dtype == want.dtype and got.shape == want.shape and got.device.type == "cpu"
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------

def test_health_and_ready(server):
    assert requests.get(server.url + "/health", timeout=5).json() == {"status": "alive", "ready": True}
    info = server.ready_info
    assert info["protocol"] == 1 and info["versions"]["torch"] == torch.__version__
    assert info["vae"]["z_channels"] == 8 and info["vae"]["dtype"] == "bfloat16" and info["vae"]["device"] == "cpu"
    assert info["caption"]["llm_dtype"] == "bfloat16" and info["caption"]["clip_dtype"] == "float32"
    assert info["limits"]["max_body_bytes"] == MAX_BODY_MB << 20 and info["auth"] is False


def test_caption_round_trip(server, local):
    got = RemoteCaptionEncoder(server.url).embedding(PROMPTS)
    want = local["caption"].embedding(PROMPTS)
    assert set(got) == {"y", "y_mask", "clip_embedding"}
    for key in want:
        assert_same(got[key], want[key])


def test_decode_round_trip_float_and_uint8(server, local):
    from stepvideo.io.frames import to_uint8_frames

    vae = RemoteVAE(server.url)
    z = _latents(0)
    want = local["vae"].decode(z)
    video = vae.decode(z)
    assert_same(video, want)
    frames = vae.decode(z, output="uint8")
    assert_same(frames, to_uint8_frames(want))
    assert_same(RemoteVAE(server.url, output="uint8").decode(z.to(torch.bfloat16)),
                to_uint8_frames(local["vae"].decode(z.to(torch.bfloat16))))
    assert vae.z_channels == 8


def test_encode_round_trip_mean_and_seeded_sample(server, local):
    vae = RemoteVAE(server.url)
    x = _video(1)
    assert_same(vae.encode(x, mode="mean"), local["vae"].encode(x, mode="mean"))
    sample = vae.encode(x, seed=7)
    assert_same(sample, local["vae"].encode(x, generator=torch.Generator().manual_seed(7)))
    assert_same(vae.encode(x, seed=7), sample)
    assert not torch.equal(vae.encode(x, seed=8), sample)
    a = vae.encode(x, generator=torch.Generator().manual_seed(3))
    assert_same(vae.encode(x, generator=torch.Generator().manual_seed(3)), a)


# ----------------------------------------------------------------------------------------
# Bad requests: the right 4xx, a JSON message that names the problem, and the server goes on
# ----------------------------------------------------------------------------------------

def _tensors(name: str, tensor: torch.Tensor, **options) -> bytes:
    return save({name: tensor}, metadata={"stepvideo_protocol": "1", "options": json.dumps(options)})


BAD_REQUESTS = [
    # (method, route, content type, body, status, words the error must contain)
    ("POST", "/vae-api", TENSOR_CONTENT_TYPE, b"\x00garbage" * 9, 400, "not a stepvideo tensor message"),
    ("POST", "/vae-api", TENSOR_CONTENT_TYPE, pickle.dumps({"samples": torch.zeros(1)}), 400, "not a stepvideo"),
    ("POST", "/vae-api", "application/octet-stream", pickle.dumps({"samples": torch.zeros(1)}), 415, "Content-Type"),
    ("POST", "/vae-api", TENSOR_CONTENT_TYPE, _tensors("samples", torch.zeros(1, 3, 8, 2, 2, dtype=torch.int64)),
     400, "dtype int64"),
    ("POST", "/vae-api", TENSOR_CONTENT_TYPE, _tensors("samples", torch.zeros(3, 8, 2, 2)), 400, "rank-5"),
    ("POST", "/vae-api", TENSOR_CONTENT_TYPE, _tensors("samples", torch.zeros(1, 3, 64, 2, 2)), 400,
     "dim 2 must be 8"),
    ("POST", "/vae-api", TENSOR_CONTENT_TYPE, _tensors("samples", torch.full((1, 3, 8, 2, 2), float("nan"))), 400,
     "NaN"),
    ("POST", "/vae-api", TENSOR_CONTENT_TYPE, _tensors("latents", torch.zeros(1, 3, 8, 2, 2)), 400, "['samples']"),
    ("POST", "/vae-api", TENSOR_CONTENT_TYPE, _tensors("samples", torch.zeros(1, 3, 8, 2, 2), output="png"), 400,
     "'output'"),
    ("POST", "/vae-api", TENSOR_CONTENT_TYPE, _tensors("samples", torch.zeros(1, 3, 8, 2, 2), colour=1), 400,
     "unknown option"),
    ("POST", "/vae-api", TENSOR_CONTENT_TYPE, b"\x00" * ((MAX_BODY_MB << 20) + 4096), 413, "larger than"),
    ("POST", "/vae-encode-api", TENSOR_CONTENT_TYPE, _tensors("videos", torch.zeros(1, 5, 3, 32, 32)), 400,
     "17"),
    ("POST", "/vae-encode-api", TENSOR_CONTENT_TYPE, _tensors("videos", torch.zeros(1, 17, 3, 32, 32), seed="x"),
     400, "'seed'"),
    ("POST", "/caption-api", JSON_CONTENT_TYPE, b"{not json", 400, "not valid JSON"),
    ("POST", "/caption-api", JSON_CONTENT_TYPE, encode_json({"prompts": "a cat"}), 400, "non-empty list"),
    ("POST", "/caption-api", JSON_CONTENT_TYPE, encode_json({"prompts": ["x"] * 17}), 400, "at most 16"),
    ("POST", "/caption-api", JSON_CONTENT_TYPE, encode_json({"prompts": ["x" * 9000]}), 400, "at most 8192"),
    ("POST", "/caption-api", JSON_CONTENT_TYPE, encode_json({"prompts": ["a"], "protocol": 2}), 400,
     "protocol version 2"),
    ("POST", "/caption-api", "text/plain", b"a cat", 415, "application/json"),
    ("GET", "/caption-api", None, None, 405, "not allowed"),
    ("POST", "/ready", JSON_CONTENT_TYPE, b"{}", 405, "use GET"),
    ("GET", "/api/v2/everything", None, None, 404, "unknown route"),
]


@pytest.mark.parametrize("method, route, ctype, body, status, words", BAD_REQUESTS,
                         ids=[f"{r[1]}-{r[4]}-{r[5][:14]}" for r in BAD_REQUESTS])
def test_bad_request_gets_4xx_and_server_keeps_serving(server, method, route, ctype, body, status, words):
    headers = {"Content-Type": ctype} if ctype else {}
    resp = requests.request(method, server.url + route, data=body, headers=headers, timeout=30)
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith(JSON_CONTENT_TYPE)
    assert words in resp.json()["error"]
    assert server.proc.poll() is None
    assert RemoteVAE(server.url).decode(_latents(5, frames=1, size=1)).shape == (1, 1, 3, 16, 16)


def test_client_quotes_the_server_error(server):
    with pytest.raises(ServiceError, match=r"HTTP 400: samples \[B, F, C, h, w\]: dim 2 must be 8") as info:
        RemoteVAE(server.url).decode(torch.zeros(1, 3, 4, 2, 2))
    assert info.value.status == 400
    too_big = torch.zeros(1, 3, 8, 128, 256)     # 3 MiB: refused by waitress itself (plain text), still a 413
    with pytest.raises(ServiceError, match="HTTP 413.*max_body_mb") as info:
        RemoteVAE(server.url, retries=0).decode(too_big)
    assert info.value.status == 413
    with pytest.raises(ValueError, match="list of strings"):     # the local check, before any request
        RemoteCaptionEncoder(server.url).embedding("a cat")


# ----------------------------------------------------------------------------------------
# Concurrency
# ----------------------------------------------------------------------------------------

def test_eight_concurrent_clients(server, local):
    jobs = [("caption", [f"prompt number {i}", "neg"]) if i % 2 else ("decode", _latents(100 + i)) for i in range(8)]
    want = [local["caption"].embedding(arg) if kind == "caption" else local["vae"].decode(arg) for kind, arg in jobs]
    results: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def work(i):
        kind, arg = jobs[i]
        barrier.wait()
        try:
            results[i] = (RemoteCaptionEncoder(server.url).embedding(arg) if kind == "caption"
                          else RemoteVAE(server.url).decode(arg))
        except Exception as err:  # noqa: BLE001 - reported below
            results[i] = err

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for got, expected in zip(results, want):
        assert not isinstance(got, Exception), got
        if isinstance(expected, dict):
            for key in expected:
                assert_same(got[key], expected[key])
        else:
            assert_same(got, expected)


# ----------------------------------------------------------------------------------------
# Token, and a server that dies
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def token_server(tiny_model_dir):
    """VAE only, token from the environment variable."""
    srv = ServerProcess(tiny_model_dir, "--no_caption", env={"STEPVIDEO_SERVICE_TOKEN": "tiny-secret"})
    try:
        srv.wait_ready(token="tiny-secret")
        yield srv
    finally:
        srv.stop()


def test_token_required_on_every_request(token_server, monkeypatch):
    url = token_server.url
    monkeypatch.delenv("STEPVIDEO_SERVICE_TOKEN", raising=False)
    body = encode_tensors({"samples": _latents(0)})
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic tiny-secret"}):
        for method, route in (("GET", "/health"), ("GET", "/ready"), ("POST", "/vae-api"), ("GET", "/nope")):
            resp = requests.request(method, url + route, headers={"Content-Type": TENSOR_CONTENT_TYPE, **headers},
                                    data=body if method == "POST" else None, timeout=30)
            assert resp.status_code == 401 and "token" in resp.json()["error"], (route, headers)
    with pytest.raises(ServiceError, match="HTTP 401") as info:
        RemoteVAE(url).decode(_latents(0))
    assert info.value.status == 401
    assert RemoteVAE(url, token="tiny-secret").decode(_latents(0)).shape == (1, 17, 3, 32, 32)
    monkeypatch.setenv("STEPVIDEO_SERVICE_TOKEN", "tiny-secret")          # the client reads it too
    assert RemoteVAE(url).decode(_latents(0)).shape == (1, 17, 3, 32, 32)
    with pytest.raises(ServiceError, match="without the caption model") as info:
        RemoteCaptionEncoder(url).embedding(["a"])
    assert info.value.status == 404


def test_server_killed_mid_request(token_server):
    vae = RemoteVAE(token_server.url, token="tiny-secret", retries=0)
    z = _latents(1, frames=24, size=8)            # a decode that takes seconds on CPU (8 chunks)
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(_call(vae.decode, z)))
    worker.start()
    time.sleep(0.5)                               # the request is in the server by now
    token_server.stop()
    worker.join(60)
    assert isinstance(outcome[0], ServiceConnectionError), outcome
    assert "lost before the answer was complete" in str(outcome[0])
    with pytest.raises(ServiceConnectionError, match="cannot connect"):
        RemoteVAE(token_server.url, token="tiny-secret", retries=1, backoff=0.01).decode(z)


def _call(fn, *args):
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - inspected by the test
        return err


# ----------------------------------------------------------------------------------------
# Client behaviour against stand-in servers (no models)
# ----------------------------------------------------------------------------------------



def test_client_reports_server_down():
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(ServiceConnectionError, match=r"cannot connect to the caption service .* after 3 attempt"):
        RemoteCaptionEncoder(url, retries=2, backoff=0.01).embedding(["a"])
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("reply", [b"", b"HTTP/1.1 200 OK\r\nContent-Type: application/x-stepvideo-tensors\r\n"
                                        b"Content-Length: 1000\r\n\r\n0123456789"])
def test_client_reports_connection_closed_mid_request(reply):
    """A loopback socket that reads the request, sends ``reply`` (nothing, or a cut-off answer) and closes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_once():
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            conn.sendall(reply)

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    with pytest.raises(ServiceConnectionError, match="lost before the answer was complete"):
        RemoteCaptionEncoder(url, retries=0).embedding(["a"])
    thread.join(10)
    listener.close()


class _Scripted(http.server.BaseHTTPRequestHandler):
    replies: list = []     # (status, headers, body), consumed in order
    seen: list = []

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).seen.append(self.path)
        status, headers, body = type(self).replies.pop(0)
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Scripted.replies, _Scripted.seen = [], []
    yield f"http://127.0.0.1:{server.server_address[1]}", _Scripted
    server.shutdown()
    server.server_close()


def test_client_retries_503_then_succeeds(scripted):
    url, handler = scripted
    busy = (503, {"Content-Type": JSON_CONTENT_TYPE, "Retry-After": "0"}, encode_json({"error": "device busy"}))
    ok = encode_tensors({"y": torch.ones(1, 2, 3, dtype=torch.bfloat16), "y_mask": torch.ones(1, 79).long(),
                         "clip_embedding": torch.zeros(1, 77, 3, dtype=torch.bfloat16)})
    handler.replies = [busy, busy, (200, {"Content-Type": TENSOR_CONTENT_TYPE}, ok)]
    out = RemoteCaptionEncoder(url, retries=2, backoff=0.01).embedding(["a"])
    assert handler.seen == ["/caption-api"] * 3 and out["y"].shape == (1, 2, 3)

    handler.replies = [busy, busy]
    with pytest.raises(ServiceError, match="HTTP 503: device busy") as info:
        RemoteCaptionEncoder(url, retries=1, backoff=0.01).embedding(["a"])
    assert info.value.status == 503


def test_client_rejects_answers_that_are_not_the_protocol(scripted):
    url, handler = scripted
    handler.replies = [(200, {"Content-Type": "text/html"}, b"<html>hello</html>"),
                       (200, {"Content-Type": TENSOR_CONTENT_TYPE}, b"garbage!garbage!"),
                       (500, {"Content-Type": "text/plain"}, b"proxy exploded")]
    with pytest.raises(ServiceError, match="Content-Type text/html"):
        RemoteVAE(url, retries=0).decode(_latents(0))
    with pytest.raises(ServiceError, match="malformed answer"):
        RemoteVAE(url, retries=0).decode(_latents(0))
    with pytest.raises(ServiceError, match="HTTP 500: proxy exploded"):
        RemoteVAE(url, retries=0).decode(_latents(0))
