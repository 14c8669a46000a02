"""Service pieces without a server process: wire format, URL normaliser, uint8 frames, the device
gate, and the Flask app (``create_app``) driven through ``test_client`` with fake models."""
from __future__ import annotations

import json
import pickle
import struct
import threading
import time
from concurrent.futures import Future

import pytest
import torch
from safetensors.torch import save

from stepvideo.io.frames import to_uint8_frames
from stepvideo.service.client import normalize_service_url
from stepvideo.service.components import ServiceComponents
from stepvideo.service.config import ServiceConfig
from stepvideo.service.gate import DeviceBusy, DeviceGate
from stepvideo.service.protocol import (JSON_CONTENT_TYPE, PROTOCOL_HEADER, TENSOR_CONTENT_TYPE, ProtocolError,
                                        check_tensor, decode_json, decode_tensors, encode_json, encode_tensors,
                                        read_header)

# ----------------------------------------------------------------------------------------
# Tensor messages
# ----------------------------------------------------------------------------------------


def test_tensor_round_trip_keeps_dtypes_shapes_values_and_options():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "y": torch.randn(2, 5, 6, generator=g).to(torch.bfloat16),
        "mask": torch.randint(0, 2, (2, 7), generator=g),
        "frames": torch.randint(0, 256, (1, 2, 3, 4, 4), generator=g).to(torch.uint8),
        "half": torch.randn(3, generator=g).half(),
        "strided": torch.randn(4, 6, generator=g).t(),          # non-contiguous input
    }
    msg = decode_tensors(encode_tensors(tensors, {"mode": "mean", "seed": 3}))
    assert msg.options == {"mode": "mean", "seed": 3}
    assert set(msg.tensors) == set(tensors)
    for name, t in tensors.items():
        assert msg.tensors[name].dtype == t.dtype and torch.equal(msg.tensors[name], t), name
    msg.tensors["y"].add_(1)    # decoded tensors are ordinary writable CPU tensors


def test_header_is_read_without_the_data():
    body = encode_tensors({"samples": torch.zeros(1, 3, 8, 2, 2)}, {"output": "uint8"})
    specs, options = read_header(body)
    assert specs["samples"].dtype == torch.float32 and specs["samples"].shape == (1, 3, 8, 2, 2)
    assert options == {"output": "uint8"}


def _st_body(tensors, metadata):
    return save(tensors, metadata=metadata)


@pytest.mark.parametrize("body, needle", [
    (b"", "only 0 bytes"),
    (b"hello world, not tensors", "announce"),
    (pickle.dumps({"samples": torch.zeros(2)}), "not a stepvideo tensor message"),
    (struct.pack("<Q", 10) + b"{not json}", "unreadable JSON header"),
    (_st_body({"a": torch.zeros(2)}, None), "no 'stepvideo_protocol'"),
    (_st_body({"a": torch.zeros(2)}, {"stepvideo_protocol": "2"}), "protocol version '2' is not supported"),
    (_st_body({"a": torch.zeros(2, dtype=torch.float64)}, {"stepvideo_protocol": "1"}), "'F64' is not allowed"),
    (_st_body({"a": torch.zeros(2)}, {"stepvideo_protocol": "1", "options": "[1]"}), "must be a JSON object"),
    (encode_tensors({"a": torch.zeros(64)})[:-10], "truncated"),
])
def test_malformed_tensor_bodies_are_rejected_with_a_reason(body, needle):
    with pytest.raises(ProtocolError) as info:
        decode_tensors(body)
    assert needle in str(info.value) and info.value.status == 400


def test_inconsistent_header_is_rejected():
    body = bytearray(encode_tensors({"a": torch.zeros(4)}))
    header_len = struct.unpack("<Q", body[:8])[0]
    header = json.loads(body[8:8 + header_len])
    header["a"]["shape"] = [5]                         # 5 floats need 20 bytes, the offsets give 16
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
    body[8:8 + header_len] = raw
    with pytest.raises(ProtocolError, match="needs 20 bytes"):
        decode_tensors(bytes(body))


def test_expected_names_and_unsupported_dtypes():
    body = encode_tensors({"latents": torch.zeros(1)})
    with pytest.raises(ProtocolError, match=r"exactly \['samples'\]"):
        decode_tensors(body, expected_names=["samples"])
    with pytest.raises(ProtocolError, match="float64"):
        encode_tensors({"x": torch.zeros(1, dtype=torch.float64)})


def test_check_tensor_names_rank_channels_dtype_and_nan():
    z = torch.zeros(1, 3, 8, 2, 2)
    assert check_tensor("samples", z, ndim=5, sizes={2: 8}) is z
    with pytest.raises(ProtocolError, match="rank-5"):
        check_tensor("samples", z[0], ndim=5)
    with pytest.raises(ProtocolError, match="dim 2 must be 8"):
        check_tensor("samples", torch.zeros(1, 3, 4, 2, 2), ndim=5, sizes={2: 8})
    with pytest.raises(ProtocolError, match="dtype int64"):
        check_tensor("samples", z.long(), ndim=5)
    bad = z.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    bad[0, 0, 0, 0, 1] = float("inf")
    with pytest.raises(ProtocolError, match="2 value"):
        check_tensor("samples", bad)
    with pytest.raises(ProtocolError, match="empty"):
        check_tensor("samples", torch.zeros(1, 0, 8, 2, 2))


def test_json_messages():
    assert decode_json(encode_json({"prompts": ["一只猫"]})) == {"prompts": ["一只猫"]}
    for body, needle in [(b"\xff\xfe", "UTF-8"), (b"{", "not valid JSON"), (b"[1]", "must be an object"),
                         (b'{"protocol": 7}', "protocol version 7")]:
        with pytest.raises(ProtocolError, match=needle):
            decode_json(body)


# ----------------------------------------------------------------------------------------
# URLs, frames, gate
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, want", [
    ("127.0.0.1", "http://127.0.0.1:8080"),
    ("gpu-7", "http://gpu-7:8080"),
    ("gpu-7:9000", "http://gpu-7:9000"),
    ("http://gpu-7:9000/", "http://gpu-7:9000"),
    ("http://gpu-7", "http://gpu-7:8080"),
    ("https://proxy.example/stepvideo/", "https://proxy.example:8080/stepvideo"),
    ("::1", "http://[::1]:8080"),
    ("[::1]:9000", "http://[::1]:9000"),
    (" 10.0.0.5 ", "http://10.0.0.5:8080"),
])
def test_normalize_service_url(url, want):
    assert normalize_service_url(url) == want


@pytest.mark.parametrize("url", ["", "ftp://host", "host:http", "host:70000", "http://", "a b"])
def test_normalize_service_url_rejects(url):
    with pytest.raises(ValueError):
        normalize_service_url(url)


def test_to_uint8_frames_matches_reference_arithmetic():
    g = torch.Generator().manual_seed(0)
    video = (torch.randn(1, 3, 3, 8, 8, generator=g) * 1.2).to(torch.bfloat16)
    video.view(-1)[:8] = torch.tensor([-1.0, 1.0, 0.999, -0.999, 3.0, -3.0, 0.0, 0.5]).to(torch.bfloat16)
    before = video.clone()
    want = ((video.clamp(-1, 1) + 1) * 127.5).clamp(0, 255).to(torch.uint8)   # spec 5.7, all in bf16
    got = to_uint8_frames(video)
    assert got.dtype == torch.uint8 and torch.equal(got, want)
    assert torch.equal(video, before)
    # 0.999 rounds to bf16 0.99609375; +1 rounds to 2.0 in bf16, so it maps to 255 (not 254)
    assert got.view(-1)[:8].tolist() == [0, 255, 255, 0, 255, 0, 127, 191]
    with pytest.raises(ValueError, match="floating-point"):
        to_uint8_frames(got)


def test_device_gate_queue_and_timeout():
    gate = DeviceGate("cpu", queue_size=1, timeout=0.2)
    entered, release = threading.Event(), threading.Event()

    def hold():
        with gate.hold():
            entered.set()
            release.wait(5)

    runner = threading.Thread(target=hold)
    runner.start()
    entered.wait(5)
    waiter_result = []
    waiter = threading.Thread(target=lambda: waiter_result.append(_try_hold(gate)))
    waiter.start()
    deadline = time.monotonic() + 5
    while gate.waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(DeviceBusy, match="queue is full") as info:   # 1 running + 1 waiting = full
        with gate.hold():
            pass
    assert info.value.retry_after >= 1
    waiter.join()
    assert "without getting it" in waiter_result[0]                 # the waiter timed out
    release.set()
    runner.join()
    with gate.hold():                                              # free again
        pass


def _try_hold(gate):
    try:
        with gate.hold():
            return "ok"
    except DeviceBusy as err:
        return str(err)


# ----------------------------------------------------------------------------------------
# The app with fake models (test_client, no sockets)
# ----------------------------------------------------------------------------------------

class FakeVAE:
    z_channels, in_channels, dtype = 4, 3, torch.bfloat16

    def __init__(self):
        self.fail = None

    def decode(self, z):
        if self.fail is not None:
            raise self.fail
        return torch.zeros(z.shape[0], 1, 3, 16 * z.shape[3], 16 * z.shape[4], dtype=torch.bfloat16)

    def encode(self, x, generator=None, mode="sample"):
        return torch.zeros(x.shape[0], 1, 4, x.shape[3] // 16, x.shape[4] // 16, dtype=torch.bfloat16)


class FakeCaption:
    def embedding(self, prompts):
        b = len(prompts)
        return {"y": torch.zeros(b, 3, 2, dtype=torch.bfloat16), "y_mask": torch.ones(b, 80, dtype=torch.int64),
                "clip_embedding": torch.zeros(b, 77, 2, dtype=torch.bfloat16)}


def _app(components, **cfg):
    from stepvideo.service.server import create_app
    return create_app(components, ServiceConfig(**cfg)).test_client()


def _decode(client, z=None, token=None):
    headers = {"Content-Type": TENSOR_CONTENT_TYPE}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return client.post("/vae-api", data=encode_tensors({"samples": torch.zeros(1, 1, 4, 1, 1) if z is None else z}),
                       headers=headers)


def test_app_out_of_memory_returns_503_and_keeps_serving():
    vae = FakeVAE()
    client = _app(ServiceComponents(caption=FakeCaption(), vae=vae))
    vae.fail = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    resp = _decode(client)
    assert resp.status_code == 503 and int(resp.headers["Retry-After"]) > 0
    assert "out of memory" in resp.get_json()["error"]
    vae.fail = RuntimeError("unexpected bug")
    resp = _decode(client)
    assert resp.status_code == 500 and "RuntimeError: unexpected bug" in resp.get_json()["error"]
    vae.fail = None
    resp = _decode(client)
    assert resp.status_code == 200 and resp.headers[PROTOCOL_HEADER] == "1"
    assert decode_tensors(resp.data).tensors["video"].shape == (1, 1, 3, 16, 16)


def test_app_busy_device_returns_503():
    client = _app(ServiceComponents(caption=FakeCaption(), vae=FakeVAE()), queue_size=0, queue_timeout=0.1)
    gate = client.application.extensions["stepvideo_service"].gate("cpu")
    with gate.hold():                      # something else is using the device
        resp = _decode(client)
    assert resp.status_code == 503 and "busy" in resp.get_json()["error"] and resp.headers["Retry-After"]
    assert _decode(client).status_code == 200


def test_app_loading_then_ready_then_failed_load():
    future = Future()
    client = _app(future)
    assert client.get("/health").get_json() == {"status": "alive", "ready": False}
    resp = client.get("/ready")
    assert resp.status_code == 503 and resp.get_json()["ready"] is False and resp.headers["Retry-After"]
    assert _decode(client).status_code == 503
    future.set_result(ServiceComponents(vae=FakeVAE()))
    info = client.get("/ready").get_json()
    assert info["ready"] and info["vae"]["z_channels"] == 4 and info["caption"] is None
    resp = client.post("/caption-api", data=b'{"prompts": ["a"]}', content_type=JSON_CONTENT_TYPE)
    assert resp.status_code == 404 and "without the caption model" in resp.get_json()["error"]

    failed = Future()
    failed.set_exception(FileNotFoundError("no vae_v2.safetensors"))
    resp = _app(failed).get("/ready")
    assert resp.status_code == 500 and "no vae_v2.safetensors" in resp.get_json()["error"]


def test_app_token_and_prompt_limits():
    client = _app(ServiceComponents(caption=FakeCaption(), vae=FakeVAE()), token="s3cret", max_prompts=2,
                  max_prompt_chars=5)
    assert client.get("/health").status_code == 401
    assert client.get("/nope").status_code == 401            # no route discovery without the token
    assert _decode(client, token="wrong").status_code == 401
    assert _decode(client, token="s3cret").status_code == 200
    auth = {"Authorization": "Bearer s3cret"}
    for prompts, needle in [(["a", "b", "c"], "at most 2"), (["toolong"], "at most 5"), ([1], "must be a string"),
                            ([], "non-empty")]:
        resp = client.post("/caption-api", data=encode_json({"prompts": prompts}), content_type=JSON_CONTENT_TYPE,
                           headers=auth)
        assert resp.status_code == 400 and needle in resp.get_json()["error"], prompts
    resp = client.post("/caption-api", data=encode_json({"prompts": ["ok"]}), content_type=JSON_CONTENT_TYPE,
                       headers=auth)
    assert resp.status_code == 200
    assert decode_tensors(resp.data).tensors["y_mask"].shape == (1, 80)
