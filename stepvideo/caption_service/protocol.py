"""Wire format of the caption/VAE service. No pickle anywhere.

Two body kinds, told apart by the ``Content-Type`` header:

* ``application/json`` (:data:`JSON_CONTENT_TYPE`): the caption request
  ``{"prompts": [str, ...], "protocol": 1}`` and every error ``{"error": "..."}``.
* ``application/x-stepvideo-tensors`` (:data:`TENSOR_CONTENT_TYPE`): tensors, encoded as one
  safetensors blob (``safetensors.torch.save`` / ``load``)::

      8 bytes   little-endian u64 N = length of the JSON header
      N bytes   JSON header: {"__metadata__": {"stepvideo_protocol": "1", "options": "<json object>"},
                              "<name>": {"dtype": "BF16", "shape": [...], "data_offsets": [a, b]}, ...}
      rest      raw little-endian tensor data

  The safetensors header *is* our JSON header: it carries the protocol version, the request
  options (for example ``{"output": "uint8"}``) and the name, dtype and shape of every tensor.
  :func:`read_header` checks all of that (bounded header size, known dtypes, byte counts that
  match the shapes, no data past the end) before a single tensor byte is materialised, and any
  body can be saved to disk and opened with ordinary safetensors tools.

Every decoding problem raises :class:`ProtocolError` (a ``ValueError`` carrying the HTTP status
the server answers with), with a message that names the problem.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch

from ..http_errors import JSON_CONTENT_TYPE, media_type  # noqa: F401  (part of this protocol's names)

PROTOCOL_VERSION = 1
TENSOR_CONTENT_TYPE = "application/x-stepvideo-tensors"
PROTOCOL_HEADER = "X-Stepvideo-Protocol"      # sent with every server response

VERSION_KEY = "stepvideo_protocol"            # safetensors __metadata__ keys
OPTIONS_KEY = "options"
MAX_HEADER_BYTES = 1 << 20                    # our headers are < 1 KiB; anything near 1 MiB is hostile
MAX_JSON_DEPTH = 32                           # our messages nest 2 deep; json.loads recurses per level

# safetensors dtype codes <-> torch dtypes that may travel (others are refused)
WIRE_DTYPES: Dict[str, torch.dtype] = {
    "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool,
}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = [
    "PROTOCOL_VERSION", "TENSOR_CONTENT_TYPE", "JSON_CONTENT_TYPE", "PROTOCOL_HEADER", "FLOAT_DTYPES",
    "ProtocolError", "TensorSpec", "TensorMessage", "encode_tensors", "read_header", "decode_tensors",
    "encode_json", "decode_json", "loads_bounded", "check_tensor", "check_text", "dtype_name", "media_type",
]


class ProtocolError(ValueError):
    """A body that does not follow the protocol. ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling used in messages and ``/ready``)."""
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------
# Tensor messages
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """One tensor entry of a message header."""

    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class TensorMessage:
    """A decoded tensor body: CPU tensors by name plus the request/response options."""

    tensors: Dict[str, torch.Tensor]
    options: Dict[str, Any] = field(default_factory=dict)


def encode_tensors(tensors: Mapping[str, torch.Tensor], options: Optional[Mapping[str, Any]] = None) -> bytes:
    """Serialise ``tensors`` (any device; moved to CPU, made contiguous) and ``options`` (a
    JSON-able dict) into one tensor body."""
    cpu = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name!r} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in WIRE_DTYPES.values():
            raise ProtocolError(f"{name!r} has dtype {dtype_name(tensor.dtype)}, which the protocol does not carry "
                                f"(allowed: {', '.join(dtype_name(d) for d in WIRE_DTYPES.values())})")
        cpu[name] = tensor.detach().to("cpu").contiguous()
    from safetensors.torch import save

    metadata = {VERSION_KEY: str(PROTOCOL_VERSION), OPTIONS_KEY: json.dumps(dict(options or {}))}
    return save(cpu, metadata=metadata)


def read_header(body: bytes, max_header_bytes: int = MAX_HEADER_BYTES,
                max_depth: int = MAX_JSON_DEPTH) -> Tuple[Dict[str, TensorSpec], Dict[str, Any]]:
    """Parse and check the header of a tensor body without touching its data.

    Returns ``(specs by name, options)``. Raises :class:`ProtocolError` for bodies that are not
    stepvideo tensor messages (garbage, pickles, truncated data), for another protocol version,
    unknown dtypes, or byte ranges that do not match the shapes.
    """
    size = len(body)
    not_ours = f"body is not a stepvideo tensor message ({TENSOR_CONTENT_TYPE}: safetensors bytes with a JSON header)"
    if size < 8:
        raise ProtocolError(f"{not_ours}: only {size} bytes")
    (header_len,) = struct.unpack("<Q", bytes(body[:8]))
    if header_len == 0 or header_len > max_header_bytes or 8 + header_len > size:
        raise ProtocolError(f"{not_ours}: its first 8 bytes announce a {header_len}-byte header "
                            f"(limit {max_header_bytes}, body {size} bytes)")
    try:
        header = loads_bounded(bytes(body[8:8 + header_len]).decode("utf-8"), max_depth, "tensor header")
    except ProtocolError:
        raise
    except (UnicodeDecodeError, ValueError) as err:
        raise ProtocolError(f"{not_ours}: unreadable JSON header ({err})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"tensor header must be a JSON object, got {type(header).__name__}")

    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or VERSION_KEY not in metadata:
        raise ProtocolError(f"tensor header has no {VERSION_KEY!r} entry in __metadata__: plain safetensors bytes "
                            "are not a stepvideo message (build requests with stepvideo.caption_service.protocol."
                            "encode_tensors or the stepvideo.caption_service.client classes)")
    version = metadata[VERSION_KEY]
    if version != str(PROTOCOL_VERSION):
        raise ProtocolError(f"protocol version {version!r} is not supported: this side speaks version "
                            f"{PROTOCOL_VERSION}; use the same stepvideo version on client and server")
    try:
        options = loads_bounded(metadata.get(OPTIONS_KEY) or "{}", max_depth, "tensor header options")
    except ProtocolError:
        raise
    except (TypeError, ValueError) as err:
        raise ProtocolError(f"tensor header options are not valid JSON ({err})") from None
    if not isinstance(options, dict):
        raise ProtocolError(f"tensor header options must be a JSON object, got {type(options).__name__}")

    data_size = size - 8 - header_len
    specs: Dict[str, TensorSpec] = {}
    for name, entry in header.items():
        try:
            code, shape, (start, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ProtocolError(f"tensor {name!r}: header entry must hold dtype, shape and data_offsets") from None
        if code not in WIRE_DTYPES:
            raise ProtocolError(f"tensor {name!r}: dtype {code!r} is not allowed on the wire "
                                f"(allowed: {', '.join(WIRE_DTYPES)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ProtocolError(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
        dtype = WIRE_DTYPES[code]
        expected = math.prod(shape) * dtype.itemsize
        if not (isinstance(start, int) and isinstance(stop, int)) or not 0 <= start <= stop <= data_size:
            raise ProtocolError(f"tensor {name!r}: data offsets {[start, stop]} fall outside the "
                                f"{data_size}-byte data section (truncated body?)")
        if stop - start != expected:
            raise ProtocolError(f"tensor {name!r}: shape {shape} in {dtype_name(dtype)} needs {expected} bytes, "
                                f"the header gives {stop - start}")
        specs[name] = TensorSpec(name, dtype, tuple(shape))
    return specs, options


def decode_tensors(body: bytes, expected_names: Optional[Iterable[str]] = None,
                   max_header_bytes: int = MAX_HEADER_BYTES, max_depth: int = MAX_JSON_DEPTH) -> TensorMessage:
    """Decode a tensor body (see :func:`read_header` for the checks).

    ``expected_names``: the exact set of tensor names the message must hold (None: any).
    Tensors come back on CPU, writable, in their wire dtype.
    """
    specs, options = read_header(body, max_header_bytes, max_depth)
    if expected_names is not None:
        want, got = sorted(expected_names), sorted(specs)
        if want != got:
            raise ProtocolError(f"tensor message must hold exactly {want}, got {got}")
    from safetensors.torch import load

    try:
        tensors = load(bytes(body))   # no copy for bytes input
    except Exception as err:  # safetensors raises its own SafetensorError for structural problems
        raise ProtocolError(f"invalid safetensors data: {err}") from None
    for name, spec in specs.items():   # the Rust parser read the same header; check it agrees
        t = tensors.get(name)
        if t is None or t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
            raise ProtocolError(f"tensor {name!r} does not match its header entry")
    return TensorMessage(tensors, options)


def check_tensor(name: str, tensor: torch.Tensor, *, ndim: Optional[int] = None,
                 sizes: Optional[Mapping[int, int]] = None, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
                 layout: str = "", finite: bool = True) -> torch.Tensor:
    """Check one received tensor; raise :class:`ProtocolError` naming ``name``, the rule and the value.

    ``sizes`` maps axis -> required size; ``layout`` (e.g. ``"[B, F, C, h, w]"``) is quoted in
    the messages. ``finite`` rejects NaN/inf in floating tensors.
    """
    where = f"{name} {layout}".strip()
    if tensor.dtype not in dtypes:
        raise ProtocolError(f"{where}: dtype {dtype_name(tensor.dtype)} is not accepted "
                            f"(expected one of {', '.join(dtype_name(d) for d in dtypes)})")
    if ndim is not None and tensor.ndim != ndim:
        raise ProtocolError(f"{where}: expected a rank-{ndim} tensor, got shape {list(tensor.shape)}")
    for axis, size in (sizes or {}).items():
        if tensor.shape[axis] != size:
            raise ProtocolError(f"{where}: dim {axis} must be {size}, got shape {list(tensor.shape)}")
    if tensor.numel() == 0:
        raise ProtocolError(f"{where}: tensor is empty (shape {list(tensor.shape)})")
    if finite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ProtocolError(f"{where}: {bad} value(s) are NaN or infinite")
    return tensor


# ----------------------------------------------------------------------------------------
# JSON messages
# ----------------------------------------------------------------------------------------

def encode_json(obj: Mapping[str, Any]) -> bytes:
    """UTF-8 JSON body (non-ASCII prompts stay readable)."""
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_SQUARE = bytes.maketrans(b"{}", b"[]")


def nesting_within(data: bytes, limit: int) -> bool:
    """True when JSON ``data`` nests ``[``/``{`` at most ``limit`` levels deep (brackets inside
    strings do not count), found without parsing, so a hostile body cannot make the parser
    recurse. Strings are cut out and the brackets kept (one kind), then each pass removes the
    innermost pairs ``[]``: the passes until nothing is left are the depth. At most ``limit + 1``
    passes of C-speed byte operations: about a second for 32 MiB of brackets."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return True
    rest = _JSON_STRING.sub(b"", data).translate(_SQUARE, _NOT_BRACKET)
    for _ in range(limit):
        if not rest:
            return True
        shorter = rest.replace(b"[]", b"")
        if len(shorter) == len(rest):        # brackets that do not pair up: not JSON, refuse it here
            return False
        rest = shorter
    return not rest


def loads_bounded(text: str, max_depth: int = MAX_JSON_DEPTH, what: str = "JSON body") -> Any:
    """``json.loads`` that refuses nesting deeper than ``max_depth`` with a :class:`ProtocolError`
    (``json.loads`` itself recurses per level and fails with RecursionError, not ValueError)."""
    if not nesting_within(text.encode("utf-8", "surrogatepass"), max_depth):
        raise ProtocolError(f"{what} nests more than {max_depth} levels deep; this service accepts at most {max_depth}")
    try:
        return json.loads(text)
    except RecursionError:
        raise ProtocolError(f"{what} nests too deeply to parse (limit {max_depth})") from None


def check_text(name: str, text: str) -> str:
    """Refuse strings that cannot be encoded as UTF-8 (lone surrogates such as ``"\\ud800"``,
    which JSON escapes can carry), naming ``name`` and the position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ProtocolError(f"{name} holds an invalid Unicode character {text[err.start]!r} at position "
                            f"{err.start} (a lone surrogate; send valid UTF-8 text)") from None
    return text


def decode_json(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> Dict[str, Any]:
    """Parse a JSON object body; :class:`ProtocolError` for anything else, naming the problem
    (invalid UTF-8, nesting deeper than ``max_depth``, not an object).
    A ``"protocol"`` field, when present, must equal :data:`PROTOCOL_VERSION`."""
    try:
        obj = loads_bounded(bytes(body).decode("utf-8"), max_depth)
    except UnicodeDecodeError as err:
        raise ProtocolError(f"JSON body is not valid UTF-8 ({err})") from None
    except ProtocolError:
        raise
    except ValueError as err:
        raise ProtocolError(f"body is not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"JSON body must be an object, got {type(obj).__name__}")
    version = obj.get("protocol", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} is not supported: this side speaks version "
                            f"{PROTOCOL_VERSION}; use the same stepvideo version on client and server")
    return obj
