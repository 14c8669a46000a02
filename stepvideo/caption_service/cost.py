"""What one service request will cost, known before it runs: shape limits and predicted peak memory.

The prediction is measured, not modelled: the loaded VAE's architecture is rebuilt with fake
tensors (``FakeTensorMode``: shapes and dtypes, no storage) and the real ``decode_chunk`` /
``encode_moments`` code runs on a fake input of the request's shape while
:class:`LiveBytesTracker` follows every tensor storage from its creation to its release. The
peak of that trace is the activation memory of one chunk. Activations scale exactly with the
batch, and chunks run one after another, so one trace per ``(chunk length, h, w)`` (batch 1)
is cached and composed with the whole request's input, output and response buffers::

    decode peak = input + B * chunk_peak(min(F, 3), h, w) + output video      (while decoding)
                  input + output video + post-processing + response body       (while answering)
    encode peak = input + input in the VAE dtype + B * chunk_peak(min(T, 17), H, W) + latents

plus :data:`RUNTIME_OVERHEAD_BYTES`. ``python benchmark/bench_service_memory.py`` prints the
prediction next to the real peak RSS of the same decode on CPU.

Why not ``torch.distributed._tools.mem_tracker.MemTracker``: it reports the same activation
peak (a test checks it), but it installs process-wide module hooks, which would fire inside
the real model calls that other request threads run at the same time. The tracker here is a
``TorchDispatchMode``, which is per thread.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from functools import lru_cache
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..accelerator import accelerator
from .protocol import ProtocolError

logger = logging.getLogger(__name__)

GiB = 1 << 30
# Real CPU peak RSS minus the traced tensor peak was 0.07-0.11 GiB for tiny-model decodes of
# 8x8 to 24x24 latents (benchmark/bench_service_memory.py): allocator arenas, thread pools,
# oneDNN scratch. Stated as a constant, like a CUDA context.
RUNTIME_OVERHEAD_BYTES = 128 << 20
SAVE_COPIES = 2                      # safetensors.torch.save: the tensor's bytes, then the body
DEFAULT_BUDGET_FRACTION = 0.5        # of the host memory available when the models are in
# A GPU runs one model call at a time (its device gate), so one request has the card's free memory
# to itself, less what the caching allocator loses to fragmentation. At 0.5 an 80 GB card that
# holds the encoders and the VAE (38.7 GiB) refused the 21.2 GiB decode of a 204-frame 544x992
# video (benchmark/rehearse.py --service, the first full-size rehearsal).
CUDA_BUDGET_FRACTION = 0.9
MAX_LATENT_FRAMES = 64               # 64 latents = 362 frames; the released models make at most 204
MAX_LATENT_SIDE = 256                # latent pixels per side (4096 pixels)


def decode_limits() -> Dict[str, int]:
    """The shape limits of a decode request, as ``/ready`` reports them (``limits``): what a
    client (the generation server) checks before it spends a DiT run on a video."""
    return {"max_latent_frames": MAX_LATENT_FRAMES, "max_latent_side": MAX_LATENT_SIDE}


class RequestTooCostly(ProtocolError):
    """A request whose predicted peak memory is over the budget (HTTP 413)."""

    def __init__(self, message: str, details: Dict[str, Any]):
        super().__init__(message, status=413)
        self.details = details


# ----------------------------------------------------------------------------------------
# Accounting
# ----------------------------------------------------------------------------------------

class LiveBytesTracker(TorchDispatchMode):
    """Bytes of the tensor storages created inside this mode and still alive; ``peak`` is the most.

    Views share their base's storage and count once. Tensors that existed before the mode
    (weights, inputs) are not counted. Works on real and fake tensors alike.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: Dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        time.sleep(0)   # a trace is pure Python: let the server's other threads (/health) in at every op
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = id(storage)
        ref = self._seen.get(key)
        if ref is not None and ref() is storage:
            return
        nbytes = storage.nbytes()
        self._seen[key] = weakref.ref(storage, lambda _, key=key, nbytes=nbytes: self._release(key, nbytes))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.pop(key, None)


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


# ----------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------

class VAECostModel:
    """Peak-memory predictions for decode and encode requests on ``vae`` (an ``AutoencoderKL``).

    The fake copy of the architecture is built on first use (importing the fake-tensor
    machinery takes seconds; :meth:`warm_up` does it ahead of time). Traces run one at a
    time (a lock) and are cached per ``(chunk length, height, width)``.
    """

    def __init__(self, vae):
        self.vae_type = type(vae)
        self.config = vae.to_config()
        self.dtype = vae.dtype
        self.z_channels = vae.z_channels
        self.in_channels = vae.in_channels
        self.frame_len = vae.frame_len
        self.latent_len = vae.latent_len
        self.s = vae.spatial_compression
        self._lock = threading.Lock()
        self._fake: Optional[Tuple[Any, Any]] = None       # (FakeTensorMode, fake module)
        self._decode_chunk = lru_cache(maxsize=64)(self._trace_decode_chunk)
        self._encode_chunk = lru_cache(maxsize=64)(self._trace_encode_chunk)

    # -- fake model and traces ------------------------------------------------------------

    def _fake_model(self):
        if self._fake is None:
            from torch._guards import detect_fake_mode
            from torch._subclasses.fake_tensor import FakeTensorMode

            active = detect_fake_mode()
            if active is not None:     # already under fake tensors (a rehearsal): one mode, no copies
                with torch.device("cpu"):
                    self._fake = (active, self.vae_type(**self.config).to(self.dtype).eval())
                return self._fake
            mode = FakeTensorMode()
            with torch.device("meta"):
                model = self.vae_type(**self.config).eval()
            cpu = torch.device("cpu")
            for module in model.modules():
                for name, p in list(module._parameters.items()):
                    if p is not None:
                        fake = mode.fake_tensor_converter.from_meta_and_device(mode, p.to(self.dtype), cpu)
                        module._parameters[name] = torch.nn.Parameter(fake, requires_grad=False)
                for name, b in list(module._buffers.items()):
                    if b is not None:
                        module._buffers[name] = mode.fake_tensor_converter.from_meta_and_device(mode, b, cpu)
            self._fake = (mode, model)
        return self._fake

    def _trace(self, run: Callable[[Any], Any], shape: Tuple[int, ...]) -> int:
        """Peak bytes created by ``run(model, x)`` for a fake input ``x`` of ``shape`` (VAE dtype)."""
        with self._lock:
            mode, model = self._fake_model()
            with mode, torch.no_grad():
                x = torch.empty(shape, dtype=self.dtype)
                tracker = LiveBytesTracker()
                with tracker:
                    run(model, x)
            return tracker.peak

    def _trace_decode_chunk(self, frames: int, h: int, w: int) -> int:
        return self._trace(lambda m, z: m.decode_chunk(z), (1, frames, self.z_channels, h, w))

    def _trace_encode_chunk(self, frames: int, h: int, w: int) -> int:
        return self._trace(lambda m, x: m.encode_moments(x), (1, frames, self.in_channels, h, w))

    def warm_up(self) -> None:
        """Build the fake model and trace one small chunk, so the first request does not wait."""
        self._decode_chunk(self.latent_len, 1, 1)

    # -- limits ---------------------------------------------------------------------------

    def check_decode_shape(self, shape: Sequence[int]) -> None:
        _, f, _, h, w = shape
        if f > MAX_LATENT_FRAMES:
            raise ProtocolError(f"samples {list(shape)}: {f} latent frames; this service decodes at most "
                                f"{MAX_LATENT_FRAMES} per request (split the request)", status=422)
        if max(h, w) > MAX_LATENT_SIDE:
            raise ProtocolError(f"samples {list(shape)}: latent size {h}x{w}; this service decodes at most "
                                f"{MAX_LATENT_SIDE} latent pixels per side ({MAX_LATENT_SIDE * self.s} pixels)",
                                status=422)

    def check_encode_shape(self, shape: Sequence[int]) -> None:
        _, t, _, h, w = shape
        if h % self.s or w % self.s:
            raise ProtocolError(f"videos {list(shape)}: height and width must be multiples of {self.s}, got {h}x{w}")
        last = t % self.frame_len or self.frame_len
        if last % 8 != 1:
            raise ProtocolError(f"videos {list(shape)}: frames must be {self.frame_len}*k, optionally plus a short "
                                f"last chunk of 8*j+1 frames; got T={t} (last chunk {last} frames)")
        if t > MAX_LATENT_FRAMES * self.frame_len // self.latent_len:
            raise ProtocolError(f"videos {list(shape)}: {t} frames; this service encodes at most "
                                f"{MAX_LATENT_FRAMES * self.frame_len // self.latent_len} per request", status=422)
        if max(h, w) > MAX_LATENT_SIDE * self.s:
            raise ProtocolError(f"videos {list(shape)}: size {h}x{w}; this service encodes at most "
                                f"{MAX_LATENT_SIDE * self.s} pixels per side", status=422)

    # -- predictions ----------------------------------------------------------------------

    def decode_bytes(self, shape: Sequence[int], wire_dtype: torch.dtype, output: str = "float") -> int:
        """Predicted peak bytes of ``POST /vae-api`` for latents ``shape [B, F, z, h, w]``."""
        b, f, _, h, w = shape
        frames = f // self.latent_len * self.frame_len + (8 * (f % self.latent_len) - 7 if f % self.latent_len else 0)
        video = (b, frames, 3, h * self.s, w * self.s)
        inputs = nbytes(shape, wire_dtype)
        out = nbytes(video, self.dtype)
        decoding = out + b * self._decode_chunk(min(f, self.latent_len), h, w)
        # to_uint8_frames makes one bf16 copy and the uint8 frames next to the video; the
        # response body is built from a copy of what is sent (safetensors' save)
        sent = nbytes(video, torch.uint8) if output == "uint8" else out
        answering = out + (out + sent if output == "uint8" else 0) + SAVE_COPIES * sent
        return inputs + max(decoding, answering) + RUNTIME_OVERHEAD_BYTES

    def encode_bytes(self, shape: Sequence[int], wire_dtype: torch.dtype) -> int:
        """Predicted peak bytes of ``POST /vae-encode-api`` for a video ``shape [B, T, 3, H, W]``."""
        b, t, _, h, w = shape
        chunks = math.ceil(t / self.frame_len)
        latents = (b, chunks * self.latent_len, self.z_channels, h // self.s, w // self.s)
        moments = 2 * nbytes(latents, self.dtype)
        # input, its copy in the VAE dtype, one chunk's encoder activations, the moments (kept per
        # chunk, concatenated) and the sampled latents (mean, std, noise in float32)
        return (nbytes(shape, wire_dtype) + nbytes(shape, self.dtype) + b * self._encode_chunk(min(t, self.frame_len), h, w)
                + 2 * moments + 4 * nbytes(latents, torch.float32) + RUNTIME_OVERHEAD_BYTES)


def cost_model_for(vae) -> Optional[VAECostModel]:
    """A :class:`VAECostModel` for an ``AutoencoderKL``-like VAE, or None (stand-ins without
    ``to_config``: no prediction, only the body-size and shape checks apply)."""
    if vae is None or not callable(getattr(vae, "to_config", None)):
        return None
    return VAECostModel(vae)


# ----------------------------------------------------------------------------------------
# The budget
# ----------------------------------------------------------------------------------------

def available_memory(device: str) -> Tuple[int, str]:
    """``(bytes, where from)``: free memory of a CUDA device, or the host's MemAvailable."""
    if device.startswith("cuda"):
        free, _ = accelerator().mem_get_info(torch.device(device))
        return int(free), f"free memory of {device}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "the host's MemAvailable"
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "the host's free pages"


def budget_fraction(device: str) -> float:
    """The share of ``device``'s free memory one request may use: :data:`CUDA_BUDGET_FRACTION` on
    a GPU, :data:`DEFAULT_BUDGET_FRACTION` of the host's memory (shared with the response bodies
    and everything else the host runs)."""
    return CUDA_BUDGET_FRACTION if device.startswith("cuda") else DEFAULT_BUDGET_FRACTION


def default_budget(devices: Sequence[str]) -> Tuple[int, str]:
    """The smallest of :func:`budget_fraction` x the available memory of each of ``devices``
    (measured after loading), and where it comes from."""
    found = []
    for device in sorted(set(devices)):
        free, where = available_memory(device)
        share = budget_fraction(device)
        found.append((int(free * share), f"{share:g} x {where} after loading ({free / GiB:.1f} GiB)"))
    return min(found)


def check_budget(what: str, shape: Sequence[int], predicted: int, budget: int) -> None:
    """Raise :class:`RequestTooCostly` (413) when ``predicted`` bytes exceed ``budget``."""
    if predicted > budget:
        details = {"route": what, "shape": list(shape), "predicted_gib": round(predicted / GiB, 3),
                   "limit_gib": round(budget / GiB, 3)}
        raise RequestTooCostly(
            f"{what} of shape {list(shape)} would need about {predicted / GiB:.2f} GiB at its peak; this service "
            f"allows {budget / GiB:.2f} GiB per request (--max_memory_gb). Send a smaller batch, fewer frames or "
            "a smaller size", details)


__all__ = ["LiveBytesTracker", "VAECostModel", "RequestTooCostly", "cost_model_for", "default_budget", "budget_fraction",
           "check_budget", "available_memory", "RUNTIME_OVERHEAD_BYTES"]
