"""Rehearse one rank of a generation: the real entry point on fake CUDA, with the audit on.

:func:`rehearse` builds the ``run_parallel.py`` command line of :class:`Rehearsal`, makes this
process rank ``rank`` of an ``nproc``-rank layout (torch's ``fake`` process-group backend: no
communication), swaps the GPU seam for :class:`~.fake_cuda.FakeCuda` cards, and calls
``stepvideo.cli.generate.generate`` (the function behind ``run_parallel.py``) under
``FakeTensorMode``. A MemTracker follows every storage on this rank's device for the whole run;
the stated CUDA constants of :mod:`stepvideo.perf.memory_accounting` are added on top, as
``benchmark/bench_memory.py`` does. ``on_gpu``: the same command line and audit on this host's
real CUDA device, with the zero weights of the shape-only folder (``scripts/gpu_check.sh``), so
the two last lines compare field by field.

Ranks other than 0 receive what rank 0 would broadcast (the prompt embeddings, the TI2V image
latent) from a shape-only run of rank 0's encode stage on the host, outside the accounting: a
``fake`` process group carries no data.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional

from ..accelerator import accelerator
from ..cli.generate import build_parser, generate
from ..config import PRESETS
from ..errors import one_line
from ..models import rope
from ..perf import memory_accounting as acc
from ..perf.memory_accounting import GIB
from ..perf.memory_profiles import PROFILES
from .audit import DeviceAudit, last_line
from .model_dir import model_dir_for
from .service import ServiceAnswers, ServiceRehearsal, answers_path, rehearse_service
from .session import DEFAULT_CARD_GIB, DeviceSession, RankExit
from .stand_in_service import fake_tensors_sent_as_zeros, stand_in_service


@dataclass
class Rehearsal:
    """What to rehearse (the flags of ``benchmark/rehearse.py``)."""

    profile: str = "80g"
    mode: str = "t2v"
    nproc: int = 1
    rank: int = 0
    ulysses_degree: int = 1
    tensor_parallel_degree: int = 1
    cfg_parallel: bool = False
    sp_backend: str = "native"
    height: int = 544
    width: int = 992
    num_frames: Optional[int] = None         # default 204 (t2v) / 102 (ti2v)
    steps: int = 2
    full: bool = True                        # the released architecture (False: the tiny model)
    card_gib: Optional[float] = None         # device memory; default: the profile's budget
    work_dir: Optional[str] = None           # where the shape-only model folder and the mp4 go
    on_gpu: bool = False                     # the same run and audit on the real CUDA device (zero weights)
    host_ram_gib: Optional[float] = 1024.0   # the host RAM pre-flight plans with (None: this machine's)
    no_service: Optional[bool] = None        # rank 0 encodes and decodes itself; default: one-GPU runs
                                             # with a memory profile; else the service is elsewhere

    @property
    def local(self) -> bool:
        """``--no_service``: the encoders and the VAE on this rank (else a service on another GPU)."""
        if self.no_service is not None:
            return self.no_service
        return self.nproc == 1 and self.profile not in ("none", "auto")

    @property
    def frames(self) -> int:
        return self.num_frames or PRESETS[self.mode].num_frames

    @property
    def layout_name(self) -> str:
        return (f"{self.mode}-{self.height}x{self.width}x{self.frames}-{self.steps}steps-{self.nproc}ranks-"
                f"sp{self.ulysses_degree}-tp{self.tensor_parallel_degree}-cfg{int(self.cfg_parallel)}-"
                f"{self.sp_backend}-{'full' if self.full else 'tiny'}-{'local' if self.local else 'service'}")

    @property
    def budget_gib(self) -> float:
        if self.card_gib is not None:
            return self.card_gib
        budget = PROFILES[self.profile].budget_gib if self.profile in PROFILES else 0    # auto: the card
        return budget if budget > 0 else DEFAULT_CARD_GIB


@dataclass
class RehearsalResult:
    config: Rehearsal
    audit: DeviceAudit
    allocated_peak: int                      # bytes, this rank's device, whole run
    stage_peaks: Dict[str, int]              # bytes, this rank's device, each stage's own peak
    placement: List[str] = field(default_factory=list)
    output: Optional[str] = None
    seconds: float = 0.0
    error: Optional[str] = None

    @property
    def peak(self) -> float:
        """Device bytes with the stated constants (context, workspaces, NCCL, reserve)."""
        return self.allocated_peak + acc.overhead_bytes(self.allocated_peak, self.config.nproc)

    @property
    def ok(self) -> bool:
        return (self.error is None and not self.audit.mixed() and self.peak / GIB <= self.config.budget_gib
                and self.audit.steps() == self.config.steps)

    def last_line(self) -> str:
        return last_line(self.audit, on_gpu=self.config.on_gpu, ok=self.ok, peak_bytes=self.peak,
                         budget_gib=self.config.budget_gib)


def command_line(r: Rehearsal, model_dir: Path, output: Path, image: Optional[Path],
                 service_url: Optional[str] = None) -> List[str]:
    """The ``run_parallel.py`` flags of the rehearsed run (``service_url``: where the caption/VAE
    service is, unless ``r.local``)."""
    argv = ["--model_dir", str(model_dir), "--prompt", "a cat on a window sill, rain outside",
            "--height", str(r.height), "--width", str(r.width), "--num_frames", str(r.frames),
            "--infer_steps", str(r.steps), "--output_path", str(output), "--decode_retries", "0",
            "--attention_backend", "auto"]
    argv += ["--no_service"] if r.local else ["--vae_url", service_url, "--caption_url", service_url]
    argv += ["--memory_profile", r.profile]
    if r.nproc > 1:
        argv += ["--ulysses_degree", str(r.ulysses_degree), "--tensor_parallel_degree",
                 str(r.tensor_parallel_degree), "--sp_backend", r.sp_backend]
        if r.cfg_parallel:
            argv.append("--cfg_parallel")
    if image is not None:
        argv += ["--first_image_path", str(image)]
    return argv


class _PlacementLog(logging.Handler):
    """The memory profile's placement events; the encoders' release ends the encode stage."""

    def __init__(self, audit: DeviceAudit):
        super().__init__(logging.DEBUG)
        self.lines: List[str] = []
        self._audit = audit

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.lines.append(message)
        if message.endswith("encode: text_encoders -> released"):
            self._audit.enter_stage("placement")


def rehearse(r: Rehearsal) -> RehearsalResult:
    """Run the rehearsal described in the module docstring; never raises for a failed run
    (``RehearsalResult.error`` holds the one-line reason)."""
    start = time.perf_counter()
    work = Path(r.work_dir or tempfile.mkdtemp(prefix="stepvideo-rehearsal-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = model_dir_for(work, r.mode, r.full)
    image = _first_image(work, r) if r.mode == "ti2v" else None
    output = work / f"rehearsal-rank{r.rank}.mp4"
    recording = work / f"broadcasts-{r.layout_name}.pickle"
    if r.on_gpu and (r.nproc != 1 or not accelerator().is_available()):
        raise ValueError("--on_gpu runs one rank on this host's CUDA device: it needs a GPU and --nproc 1")
    if r.rank != 0 and not recording.is_file():
        rehearse(replace(r, rank=0))                      # rank 0 first: its broadcasts are replayed here
    answers = None if r.local else _service_answers(work, r)

    session = DeviceSession(r.rank, r.nproc, r.budget_gib, r.steps, recording=recording, on_gpu=r.on_gpu,
                            host_ram_gib=None if r.on_gpu else r.host_ram_gib)
    placement = _PlacementLog(session.audit)
    profiles_logger = logging.getLogger("stepvideo.perf.memory_profiles")
    old_level = profiles_logger.level
    profiles_logger.setLevel(logging.DEBUG)
    profiles_logger.addHandler(placement)
    saved_partners = dict(rope._PARTNERS)        # rope's index cache must not keep fake tensors
    rope._PARTNERS.clear()
    error = None
    try:
        with contextlib.ExitStack() as stack:
            url = None
            if answers is not None:
                url = stack.enter_context(stand_in_service(answers))
                stack.enter_context(fake_tensors_sent_as_zeros())
            args = build_parser().parse_args(command_line(r, model_dir, output, image, url))
            stack.enter_context(session.running())
            generate(args)
    except RankExit as exc:                               # the rank's own failure line, unwrapped
        error = str(exc)
        logging.getLogger(__name__).debug("rehearsal failed", exc_info=True)
    except Exception as exc:                              # reported in the last line, with the cause
        error = f"{type(exc).__name__}: {one_line(exc)}"
        logging.getLogger(__name__).debug("rehearsal failed", exc_info=True)
    finally:
        rope._PARTNERS.clear()
        rope._PARTNERS.update(saved_partners)
        profiles_logger.removeHandler(placement)
        profiles_logger.setLevel(old_level)
    return RehearsalResult(config=r, audit=session.audit, allocated_peak=session.allocated_peak,
                           stage_peaks=session.stage_peaks,
                           placement=placement.lines, output=str(output) if output.is_file() else None,
                           seconds=time.perf_counter() - start, error=error)


def _service_answers(work: Path, r: Rehearsal) -> ServiceAnswers:
    """What the service elsewhere answers: the shapes of its own rehearsal at this size (run
    first when not yet in ``work``)."""
    service = ServiceRehearsal(mode=r.mode, height=r.height, width=r.width, num_frames=r.frames, full=r.full,
                               work_dir=str(work))
    path = answers_path(work, service)
    if not path.is_file():
        result = rehearse_service(service)
        if result.answers is None:
            raise ValueError(f"the service rehearsal this run needs failed: {result.error}")
    return ServiceAnswers.load(path)


def _first_image(work: Path, r: Rehearsal) -> Path:
    from PIL import Image

    path = work / f"first-{r.height}x{r.width}.png"
    if not path.is_file():
        Image.new("RGB", (r.width, r.height), (90, 120, 200)).save(path)
    return path
