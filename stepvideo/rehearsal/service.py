"""Rehearse the caption/VAE service on its own device: the requests of one generation, full size.

:func:`rehearse_service` loads the service's models with the service's own loader
(:func:`stepvideo.caption_service.components.load_components`, onto fake ``cuda:0``) from the
shape-only model folder, then runs the model work of the requests a generation sends, with the
route handlers' own functions:

* ``/caption-api``: ``CaptionEncoder.embedding`` of the two prompts the pipeline sends
  (``[prompt + pos_magic, neg_magic]``);
* ``/vae-encode-api`` (TI2V): :func:`~stepvideo.caption_service.handlers.encoded_latents` of the
  first image ``[1, 1, 3, H, W]`` (bf16, as the pipeline sends it);
* ``/vae-api``: :func:`~stepvideo.caption_service.handlers.decoded_video` of the run's latents
  ``[1, F, 64, h, w]`` (float32, as the pipeline sends them) with ``output="uint8"``.

The handlers run these under ``torch.inference_mode``; the rehearsal runs them under ``no_grad``,
which allocates the same on a device: under ``inference_mode`` composite ops (SDPA) reach
FakeTensorMode undecomposed and their real allocations (the math path's scores) would be missed.

Each request's device peak is measured (the loaded weights plus what the request adds); the VAE
requests' extra bytes are set beside the prediction of the service's cost model
(:mod:`stepvideo.caption_service.cost`), which the service checks against its budget before it
runs a request. The shapes and dtypes of the answers are kept (:class:`ServiceAnswers`) for the
stand-in service that a rank-0 rehearsal talks to (:mod:`.stand_in_service`).
"""
from __future__ import annotations

import logging
import pickle
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .. import geometry
from ..caption_service.components import load_components
from ..caption_service.config import ServiceConfig
from ..caption_service.cost import RUNTIME_OVERHEAD_BYTES, RequestTooCostly, check_budget
from ..caption_service.handlers import decoded_video, encoded_latents
from ..caption_service.state import ServiceState
from ..config import PRESETS
from ..errors import one_line
from ..perf import memory_accounting as acc
from ..perf.memory_accounting import GIB
from .audit import DeviceAudit, last_line
from .fake_group import TensorSpec
from .model_dir import model_dir_for
from .session import DEFAULT_CARD_GIB, DeviceSession

PROMPTS = ["a cat on a window sill, rain outside", ""]      # the pipeline's [prompt + pos_magic, neg_magic]
IMAGE_SEED = 0                          # the pipeline sends a seed with every image encode


@dataclass
class ServiceRehearsal:
    """What to rehearse (``benchmark/rehearse.py --service``): the requests of one generation."""

    mode: str = "t2v"
    height: int = 544
    width: int = 992
    num_frames: Optional[int] = None     # default 204 (t2v) / 102 (ti2v)
    full: bool = True
    card_gib: Optional[float] = None     # the service's device; default an 80 GB card
    work_dir: Optional[str] = None
    on_gpu: bool = False                 # the same requests and audit on this host's CUDA device (zero weights)

    @property
    def frames(self) -> int:
        return self.num_frames or PRESETS[self.mode].num_frames

    @property
    def budget_gib(self) -> float:
        return DEFAULT_CARD_GIB if self.card_gib is None else self.card_gib

    @property
    def name(self) -> str:
        return f"{self.mode}-{self.height}x{self.width}x{self.frames}-{'full' if self.full else 'tiny'}"

    def latents_shape(self, channels: int) -> Tuple[int, ...]:
        return geometry.latent_shape(self.height, self.width, self.frames, channels=channels)


ROUTES = {"image encode": "/vae-encode-api", "decode": "/vae-api"}


@dataclass
class ServiceAnswers:
    """The shapes and dtypes the rehearsed service answered (no values)."""

    caption: Dict[str, TensorSpec]                  # for len(PROMPTS) prompts
    decode_samples: Tuple[int, ...]                 # the latents it decoded
    video: TensorSpec                               # the VAE's decoded video (before uint8 frames)
    encode_videos: Optional[Tuple[int, ...]] = None
    latents: Optional[TensorSpec] = None            # the first image's latents (TI2V)
    vae: Dict[str, object] = field(default_factory=dict)   # z_channels, in_channels, dtype

    def save(self, path: Path) -> None:
        path.write_bytes(pickle.dumps(self))

    @staticmethod
    def load(path: Path) -> "ServiceAnswers":
        return pickle.loads(path.read_bytes())


@dataclass
class ServiceRehearsalResult:
    config: ServiceRehearsal
    audit: DeviceAudit
    request_peaks: Dict[str, int]                   # bytes on the device during each request
    request_starts: Dict[str, int]                  # bytes alive on the device when each request began
    predicted: Dict[str, int]                       # cost.py's prediction for the VAE requests
    loaded: int = 0                                 # bytes on the device once the models are in
    answers: Optional[ServiceAnswers] = None
    budget: int = 0                                 # the service's per-request budget (bytes)
    budget_source: str = ""
    refusals: List[str] = field(default_factory=list)   # requests the service's budget check refuses
    seconds: float = 0.0
    error: Optional[str] = None

    @property
    def request_extra(self) -> Dict[str, int]:
        """Bytes each request added to what was on the device before it."""
        return {name: peak - self.request_starts[name] for name, peak in self.request_peaks.items()}

    @property
    def allocated_peak(self) -> int:
        return max([self.loaded, *self.request_peaks.values()])

    @property
    def peak(self) -> float:
        return self.allocated_peak + acc.overhead_bytes(self.allocated_peak, 1)

    @property
    def ok(self) -> bool:
        wanted = {"caption", "decode"} | ({"image encode"} if self.config.mode == "ti2v" else set())
        return (self.error is None and not self.audit.mixed() and wanted <= set(self.request_peaks)
                and not self.refusals and self.peak / GIB <= self.config.budget_gib)

    def last_line(self) -> str:
        return last_line(self.audit, on_gpu=self.config.on_gpu, ok=self.ok, peak_bytes=self.peak,
                         budget_gib=self.config.budget_gib)

    def comparison(self) -> List[str]:
        """One line per VAE request: the measured extra bytes next to cost.py's prediction."""
        lines = []
        for name, predicted in self.predicted.items():
            extra = self.request_extra.get(name)
            if extra is None:
                continue
            traced = predicted - RUNTIME_OVERHEAD_BYTES          # the constant is the host runtime's, not a tensor
            lines.append(f"{name}: {extra / GIB:.2f} GiB on the device beyond the weights; cost.py predicts "
                         f"{traced / GIB:.2f} GiB ({(traced - extra) / max(extra, 1):+.1%}) plus its stated "
                         f"{RUNTIME_OVERHEAD_BYTES / GIB:.3f} GiB runtime constant")
        return lines


def _spec(t: torch.Tensor) -> TensorSpec:
    return TensorSpec(tuple(t.shape), t.dtype, "cpu")


def answers_path(work: Path, r: ServiceRehearsal) -> Path:
    return work / f"service-answers-{r.name}.pickle"


def rehearse_service(r: ServiceRehearsal) -> ServiceRehearsalResult:
    """Run the rehearsal of the module docstring; never raises for a failed run."""
    start = time.perf_counter()
    work = Path(r.work_dir or tempfile.mkdtemp(prefix="stepvideo-rehearsal-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = model_dir_for(work, r.mode, r.full)
    session = DeviceSession(0, 1, r.budget_gib, steps=0, on_gpu=r.on_gpu)
    predicted: Dict[str, int] = {}
    shapes: Dict[str, Tuple[int, ...]] = {}
    answers = None
    loaded = budget = 0
    budget_source = ""
    error = None
    try:
        with session.running():
            config = ServiceConfig(model_dir=str(model_dir), caption_device="cuda:0", vae_device="cuda:0")
            comps = load_components(config)
            loaded = session.used_bytes(session.device)
            state = ServiceState(comps, config)            # the service's own budget, measured now
            budget, budget_source = state.budget_bytes, state.budget_source
            with session.window("caption"):
                caption = comps.caption.embedding(PROMPTS)
                caption = {k: _spec(caption[k]) for k in ("y", "y_mask", "clip_embedding")}
            vae, latents, image = comps.vae, None, None
            if r.mode == "ti2v":
                image = torch.empty(1, 1, vae.in_channels, r.height, r.width, dtype=torch.bfloat16)
                with session.window("image encode"):
                    latents = _spec(encoded_latents(vae, image, "sample", IMAGE_SEED))
                predicted["image encode"] = comps.vae_cost.encode_bytes(image.shape, image.dtype)
                shapes["image encode"] = tuple(image.shape)
            samples = torch.empty(r.latents_shape(vae.z_channels), dtype=torch.float32)
            with session.window("decode"):
                frames = decoded_video(vae, samples, "uint8")   # the route's whole answer: uint8 frames
            video_spec = TensorSpec(tuple(frames.shape), vae.dtype, "cpu")     # what the VAE decoded
            predicted["decode"] = comps.vae_cost.decode_bytes(samples.shape, samples.dtype, "uint8")
            shapes["decode"] = tuple(samples.shape)
            answers = ServiceAnswers(caption=caption, decode_samples=tuple(samples.shape), video=video_spec,
                                     encode_videos=None if image is None else tuple(image.shape), latents=latents,
                                     vae={"z_channels": vae.z_channels, "in_channels": vae.in_channels,
                                          "dtype": vae.dtype})
    except Exception as exc:                              # reported in the last line, with the cause
        error = f"{type(exc).__name__}: {one_line(exc)}"
        logging.getLogger(__name__).debug("service rehearsal failed", exc_info=True)
    if answers is not None:
        answers.save(answers_path(work, r))
    refusals = []
    for name, predicted_bytes in predicted.items():
        try:
            check_budget(f"{name} ({ROUTES[name]})", shapes[name], predicted_bytes, budget)
        except RequestTooCostly as refused:
            refusals.append(f"413 {refused}")
    return ServiceRehearsalResult(config=r, audit=session.audit, request_peaks=dict(session.window_peaks),
                                  request_starts=dict(session.window_starts), predicted=predicted, loaded=loaded, answers=answers,
                                  budget=budget, budget_source=budget_source, refusals=refusals,
                                  seconds=time.perf_counter() - start, error=error)
