"""``python -m stepvideo.quantize MODEL_DIR --out OUT_DIR``: write the DiT's block linears as fp8 once.

See :mod:`stepvideo.quantize.writer` (how it is written) and
:mod:`stepvideo.loading.fp8_checkpoint` (the layout, and how the folder loads).
"""
from .writer import QuantizeReport, quantize_model_dir

__all__ = ["QuantizeReport", "quantize_model_dir"]
