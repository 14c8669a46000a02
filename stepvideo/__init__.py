"""stepvideo: inference toolkit for the Step-Video T2V / TI2V models.

Importing the package is cheap and side-effect free (no environment edits, no CUDA calls,
no argv parsing): the public classes are resolved lazily on first attribute access.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it (the reference's names, so user code ports unchanged)
_EXPORTS = {
    "StepVideoModel": "stepvideo.models.dit",
    "FlowMatchDiscreteScheduler": "stepvideo.schedulers.flow_match_euler",
    "AutoencoderKL": "stepvideo.models.vae",
    "Step1Model": "stepvideo.text_encoders.step_llm",
    "STEP1TextEncoder": "stepvideo.text_encoders.step_llm",
    "HunyuanClip": "stepvideo.text_encoders.hunyuan_clip",
    "CaptionEncoder": "stepvideo.text_encoders.caption",
    "StepVideoPipeline": "stepvideo.pipelines.pipeline",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stepvideo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover
    from .models.dit import StepVideoModel  # noqa: F401
    from .schedulers.flow_match_euler import FlowMatchDiscreteScheduler  # noqa: F401
