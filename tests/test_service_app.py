"""``stepvideo.caption_service.server.create_app`` driven through Flask's ``test_client`` with fake models
(no sockets): errors, busy devices, loading states, token and prompt limits."""
from __future__ import annotations

from concurrent.futures import Future

import torch

from stepvideo.caption_service.components import ServiceComponents
from stepvideo.caption_service.config import ServiceConfig
from stepvideo.caption_service.protocol import (JSON_CONTENT_TYPE, PROTOCOL_HEADER, TENSOR_CONTENT_TYPE, decode_tensors,
                                        encode_json, encode_tensors)


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
    from stepvideo.caption_service.server import create_app
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
    error = resp.get_json()["error"]             # a reference for the log, never the exception text
    assert resp.status_code == 500 and "reference err_" in error and "unexpected bug" not in error, error
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
