"""Plain configuration objects: the DiT architecture, sampling, output, and the named presets.

``DiTConfig`` is the one description of the DiT's dimensions (``transformer/config.json``):
the model, the FLOP and memory models and the tiny-model factory all read it.

``PRESETS`` is the one registry the CLIs use for ``--preset`` choices. ``__call__`` of the
pipeline keeps the reference's Python defaults; only the CLI applies a preset (``t2v``, or
``ti2v`` when an image is given), and explicit flags always win.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from . import geometry

logger = logging.getLogger(__name__)

# Default magic prompts (exact strings of the reference CLIs; the TI2V negative has no final "。")
T2V_POS_MAGIC = "超高清、HDR 视频、环境光、杜比全景声、画面稳定、流畅动作、逼真的细节、专业级构图、超现实主义、自然、生动、超细节、清晰。"
T2V_NEG_MAGIC = "画面暗、低分辨率、不良手、文本、缺少手指、多余的手指、裁剪、低质量、颗粒状、签名、水印、用户名、模糊。"
TI2V_POS_MAGIC = ("画面中的主体动作表现生动自然、画面流畅、生动细节、光线统一柔和、超真实动态捕捉、大师级运镜、整体不变形、"
                  "超高清、画面稳定、逼真的细节、专业级构图、超细节、清晰。")
TI2V_NEG_MAGIC = "动画、模糊、变形、毁容、低质量、拼贴、粒状、标志、抽象、插图、计算机生成、扭曲、动作不流畅、面部有褶皱、表情僵硬、畸形手指"


# -- the --cache spec (``SamplingConfig.cache``; applied by stepvideo.perf.cache through diffusers) --
CACHE_KINDS = {"fbc": "threshold", "taylorseer": "interval"}
OFF = ("", "none", "off")


@dataclass(frozen=True)
class CacheSpec:
    """One parsed ``--cache`` value."""

    kind: str
    value: float

    def __str__(self) -> str:
        value = int(self.value) if self.kind == "taylorseer" else self.value
        return f"{self.kind}:{value}"


def parse_cache(text: Optional[str]) -> Optional[CacheSpec]:
    """``"fbc:0.03"`` -> ``CacheSpec("fbc", 0.03)``; off values -> ``None``.

    Raises ``ValueError`` (naming the flag) for an unknown kind, a bad value, or diffusers missing.
    """
    if text is None or text.strip().lower() in OFF:
        return None
    kind, _, raw = text.strip().partition(":")
    kind = kind.lower()
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache {text!r}: unknown kind {kind!r}; use one of "
                         f"{', '.join(f'{k}:<{v}>' for k, v in CACHE_KINDS.items())} or 'none'")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"cache {text!r}: the {CACHE_KINDS[kind]} after '{kind}:' must be a number") from None
    if kind == "fbc" and not value >= 0:
        raise ValueError(f"cache {text!r}: the threshold must be >= 0")
    if kind == "taylorseer" and (value != int(value) or value < 1):
        raise ValueError(f"cache {text!r}: the interval must be an integer >= 1")
    if importlib.util.find_spec("diffusers") is None:
        raise ValueError(f"cache {text!r} needs diffusers: pip install 'stepvideo[diffusers]'")
    return CacheSpec(kind, value)


@dataclass(frozen=True)
class SamplingConfig:
    """Everything that decides the numbers of one generation besides the weights and inputs."""

    num_inference_steps: int = 50
    guidance_scale: float = 9.0
    time_shift: float = 13.0
    num_frames: int = 204
    height: int = 544
    width: int = 992
    motion_score: float = 5.0
    pos_magic: str = T2V_POS_MAGIC
    neg_magic: str = T2V_NEG_MAGIC
    seed: Optional[int] = None
    cache: Optional[str] = None       # diffusers step cache, e.g. "fbc:0.03" (stepvideo.perf.cache); None: off

    def __post_init__(self):
        if self.cache is not None:
            parse_cache(self.cache)   # a bad spec (or diffusers missing) fails here, before any work
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.time_shift <= 0:
            raise ValueError(f"time_shift must be > 0, got {self.time_shift}")
        if not self.guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0 (> 1: classifier-free guidance; <= 1: the conditional "
                             f"branch only), got {self.guidance_scale}")
        if self.num_frames < geometry.FRAMES_PER_CHUNK:
            raise ValueError(f"num_frames must be >= {geometry.FRAMES_PER_CHUNK} (one VAE chunk), "
                             f"got {self.num_frames}")
        if min(self.height, self.width) < geometry.SPATIAL_COMPRESSION:
            raise ValueError(f"height and width must be >= {geometry.SPATIAL_COMPRESSION}, "
                             f"got {self.height}x{self.width}")

    def to_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, **overrides) -> "SamplingConfig":
        """A copy with the non-None ``overrides`` applied (explicit flags win over the preset)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


PRESETS: Dict[str, SamplingConfig] = {
    # Step-Video-T2V model card: 30-50 steps, cfg 9, shift 13, 204 frames at 544x992
    "t2v": SamplingConfig(num_inference_steps=50, guidance_scale=9.0, time_shift=13.0, num_frames=204),
    # Step-Video-T2V-Turbo (step-distilled): 10-15 steps, cfg 5, shift 17
    "t2v-turbo": SamplingConfig(num_inference_steps=15, guidance_scale=5.0, time_shift=17.0, num_frames=204),
    # Step-Video-TI2V (Hugging Face card): 50 steps, cfg 9, shift 12.573, motion 5, 102 frames
    "ti2v": SamplingConfig(num_inference_steps=50, guidance_scale=9.0, time_shift=12.573, num_frames=102,
                           motion_score=5.0, pos_magic=TI2V_POS_MAGIC, neg_magic=TI2V_NEG_MAGIC),
}


# The reference pipeline's ``__call__`` defaults (spec §5.8), which ``StepVideoPipeline.__call__``
# keeps: no magic prompts and motion_score 2.0, where the reference CLIs (and the presets above)
# use the magic prompts and motion_score 5. ``num_frames`` is 204 for T2V, 102 for TI2V.
PIPELINE_CALL_DEFAULTS = SamplingConfig(num_inference_steps=50, guidance_scale=9.0, time_shift=13.0, num_frames=204,
                                        height=544, width=992, motion_score=2.0, pos_magic="", neg_magic="")
PIPELINE_CALL_TI2V_FRAMES = 102


def get_preset(name: str) -> SamplingConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class OutputConfig:
    """Where and how videos are written (rank 0 only)."""

    save_path: str = "./results"
    output_file_name: str = ""
    name_suffix: str = ""
    output_path: Optional[str] = None      # explicit file path: honoured as given
    fps: int = 25
    crop_540p: bool = True
    denoise_filter: bool = True
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------
# The DiT architecture
# ----------------------------------------------------------------------------------------

ATTENTION_TYPES = ("torch", "parallel")
CaptionChannels = Union[int, Tuple[int, int]]


@dataclass(frozen=True)
class DiTConfig:
    """The DiT's architecture: ``transformer/config.json`` (spec ``../shared/spec/STEP_VIDEO_SPEC.md``
    §3.1). Defaults are the released 30B T2V model; field names are the reference's
    ``StepVideoModel`` constructor arguments.

    ``extra`` keeps the keys of a ``config.json`` that are not architecture fields (diffusers
    bookkeeping such as ``_class_name``, or keys of a newer writer) so that :meth:`to_dict`
    writes back what was read; it takes no part in equality. Keys without a leading underscore
    are logged.
    """

    num_attention_heads: int = 48
    attention_head_dim: int = 128
    in_channels: int = 64
    out_channels: Optional[int] = 64          # None: same as in_channels
    num_layers: int = 48
    dropout: float = 0.0
    patch_size: int = 1
    norm_type: str = "ada_norm_single"       # unused switch (STEP_VIDEO_SPEC.md §3.1)
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    use_additional_conditions: bool = False   # TI2V: image condition channels + motion score
    caption_channels: CaptionChannels = (6144, 1024)   # (Step-LLM width, CLIP width) or LLM only
    attention_type: str = "parallel"
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        set_ = object.__setattr__
        if self.out_channels is None:
            set_(self, "out_channels", self.in_channels)
        if isinstance(self.caption_channels, list):
            set_(self, "caption_channels", tuple(self.caption_channels))
        set_(self, "use_additional_conditions", bool(self.use_additional_conditions))
        set_(self, "extra", dict(self.extra))
        for name in ("num_attention_heads", "in_channels", "out_channels", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DiTConfig.{name} must be an int >= 1, got {value!r}")
        if self.attention_head_dim != 128:
            raise ValueError(f"DiTConfig.attention_head_dim must be 128 (3D RoPE split [64, 32, 32]), "
                             f"got {self.attention_head_dim!r}")
        if self.patch_size != 1:
            raise ValueError(f"DiTConfig.patch_size must be 1 (the released models), got {self.patch_size!r}")
        if self.attention_type not in ATTENTION_TYPES:
            raise ValueError(f"DiTConfig.attention_type must be one of {ATTENTION_TYPES}, "
                             f"got {self.attention_type!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"DiTConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DiTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        channels = self.caption_channels
        pair_ok = (isinstance(channels, tuple) and len(channels) == 2
                   and all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in channels))
        single_ok = isinstance(channels, int) and not isinstance(channels, bool) and channels >= 1
        if not (pair_ok or single_ok):
            raise ValueError("DiTConfig.caption_channels must be [llm_width, clip_width] or llm_width "
                             f"(ints >= 1), got {channels!r}")

    # -- derived sizes ----------------------------------------------------------------------
    @property
    def inner_dim(self) -> int:
        """Model width ``D = heads * head_dim`` (6144 for the released model)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def llm_channels(self) -> int:
        """Width of the Step-LLM features ``encoder_hidden_states [B, Ltxt, C_llm]``."""
        return self.caption_channels if isinstance(self.caption_channels, int) else self.caption_channels[0]

    @property
    def clip_channels(self) -> Optional[int]:
        """Width of the CLIP features ``encoder_hidden_states_2 [B, 77, C_clip]`` (None: no CLIP path)."""
        return None if isinstance(self.caption_channels, int) else self.caption_channels[1]

    @property
    def patch_in_channels(self) -> int:
        """Channels entering the patch embedding (TI2V concatenates the condition latents)."""
        return self.in_channels * (2 if self.use_additional_conditions else 1)

    # -- dicts and files --------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "extra")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], **overrides) -> "DiTConfig":
        """From a ``config.json`` dict; ``overrides`` (architecture fields) win. Keys that are not
        fields go to ``extra``; those without a leading ``_`` are logged (likely a typo or a newer
        writer, and ignored by the model), but for ``quantization`` (:mod:`stepvideo.loading.fp8_checkpoint`)."""
        known = set(cls.field_names())
        bad = sorted(k for k in overrides if k not in known)
        if bad:
            raise ValueError(f"unknown DiTConfig field(s) {bad}; known: {', '.join(sorted(known))}")
        merged = {**config, **overrides}
        extra = {k: v for k, v in merged.items() if k not in known}
        unexpected = sorted(k for k in extra if not k.startswith("_") and k != "quantization")   # fp8 record
        if unexpected:
            logger.warning("transformer config: ignoring unknown key(s) %s", unexpected)
        return cls(**{k: v for k, v in merged.items() if k in known}, extra=extra)

    def to_dict(self) -> Dict[str, Any]:
        """The ``config.json`` dict: ``extra`` first (diffusers order), then the fields;
        ``caption_channels`` as a JSON list."""
        out = dict(self.extra)
        for name in self.field_names():
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    def model_kwargs(self) -> Dict[str, Any]:
        """The ``StepVideoModel`` constructor keyword arguments (no ``extra``)."""
        return {name: getattr(self, name) for name in self.field_names()}

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike], **overrides) -> "DiTConfig":
        """Read a ``transformer/config.json`` file, a ``transformer/`` folder or a model dir."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json" if (path / "config.json").is_file() else path / "transformer" / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"transformer config not found: {path}")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(config, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
        try:
            return cls.from_dict(config, **overrides)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err

    def to_json(self, path: Union[str, os.PathLike]) -> Path:
        """Write ``config.json`` (a folder gets ``config.json`` inside); returns the file."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    def replace(self, **changes) -> "DiTConfig":
        """A validated copy with ``changes`` applied."""
        return replace(self, **changes)
