"""``stepvideo.caption_service.protocol``: the tensor and JSON wire format (no server)."""
from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save

from stepvideo.caption_service.protocol import (ProtocolError, check_tensor, decode_json, decode_tensors, encode_json,
                                        encode_tensors, read_header)


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
