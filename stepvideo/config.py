"""Plain configuration objects and the named sampling presets.

``PRESETS`` is the one registry the CLIs use for ``--preset`` choices. ``__call__`` of the
pipeline keeps the reference's Python defaults; only the CLI applies a preset (``t2v``, or
``ti2v`` when an image is given), and explicit flags always win.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Dict, Optional

# Default magic prompts (exact strings of the reference CLIs; the TI2V negative has no final "。")
T2V_POS_MAGIC = "超高清、HDR 视频、环境光、杜比全景声、画面稳定、流畅动作、逼真的细节、专业级构图、超现实主义、自然、生动、超细节、清晰。"
T2V_NEG_MAGIC = "画面暗、低分辨率、不良手、文本、缺少手指、多余的手指、裁剪、低质量、颗粒状、签名、水印、用户名、模糊。"
TI2V_POS_MAGIC = ("画面中的主体动作表现生动自然、画面流畅、生动细节、光线统一柔和、超真实动态捕捉、大师级运镜、整体不变形、"
                  "超高清、画面稳定、逼真的细节、专业级构图、超细节、清晰。")
TI2V_NEG_MAGIC = "动画、模糊、变形、毁容、低质量、拼贴、粒状、标志、抽象、插图、计算机生成、扭曲、动作不流畅、面部有褶皱、表情僵硬、畸形手指"


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

    def __post_init__(self):
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.time_shift <= 0:
            raise ValueError(f"time_shift must be > 0, got {self.time_shift}")
        if not self.guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0 (> 1: classifier-free guidance; <= 1: the conditional "
                             f"branch only), got {self.guidance_scale}")
        if self.num_frames < 17:
            raise ValueError(f"num_frames must be >= 17 (one VAE chunk), got {self.num_frames}")
        if self.height < 16 or self.width < 16:
            raise ValueError(f"height and width must be >= 16, got {self.height}x{self.width}")

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
