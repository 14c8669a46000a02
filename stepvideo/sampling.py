"""Sampling settings from plain values, below both the command line and the job server.

:func:`sampling_from_options` is the one way from option values (flags, or a job request's
fields) to a :class:`~stepvideo.config.SamplingConfig`: the preset first, set values win, every
value checked with a message naming it. :func:`token_count` is the DiT sequence length a job
costs (``stepvideo.geometry``).
"""
from __future__ import annotations

import logging

from . import geometry
from .config import SamplingConfig, get_preset

logger = logging.getLogger(__name__)


def sampling_options(args) -> dict:
    """The sampling flags (a namespace from ``stepvideo.cli.add_sampling_args``) as ``SamplingConfig``
    field names (``None`` = unset), plus ``preset``."""
    return {"preset": args.preset, "num_inference_steps": args.infer_steps, "guidance_scale": args.cfg_scale,
            "time_shift": args.time_shift, "num_frames": args.num_frames, "height": args.height,
            "width": args.width, "motion_score": args.motion_score, "pos_magic": args.pos_magic,
            "neg_magic": args.neg_magic, "seed": args.seed, "cache": args.cache}


_OPTION_TYPES = {"num_inference_steps": int, "num_frames": int, "height": int, "width": int, "seed": int,
                 "guidance_scale": float, "time_shift": float, "motion_score": float,
                 "pos_magic": str, "neg_magic": str, "preset": str, "cache": str}


def sampling_from_options(options: dict, has_image: bool = False) -> SamplingConfig:
    """The one way from plain values to a ``SamplingConfig`` (flags, and generation-server requests).

    ``options`` maps ``SamplingConfig`` field names (and ``preset``) to values; ``None`` means
    unset. The preset (``options["preset"]``, else ``ti2v`` with an image, else ``t2v``) is applied
    first and set values win. Raises ``ValueError`` naming the option for an unknown name, a
    wrong type or a value ``SamplingConfig`` rejects.
    """
    unknown = sorted(set(options) - set(_OPTION_TYPES))
    if unknown:
        raise ValueError(f"unknown sampling option(s) {unknown}; known: {sorted(_OPTION_TYPES)}")
    for name, value in options.items():
        kind = _OPTION_TYPES[name]
        ok = value is None or (isinstance(value, kind) and not isinstance(value, bool)) or (
            kind is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            wanted = {float: "a number", int: "an integer", str: "a string"}[kind]
            raise ValueError(f"{name} must be {wanted}, got {type(value).__name__} {value!r}")
    for name in ("height", "width"):
        value = options.get(name)
        if value is not None and value != geometry.round_size(value):
            low = geometry.round_size(value)
            step = geometry.SPATIAL_COMPRESSION
            raise ValueError(f"{name} {value} is not a multiple of {step} (the VAE and the DiT patches need it); "
                             f"use {low or step} or {low + step}")
    num_frames = options.get("num_frames")
    if num_frames is not None and num_frames >= geometry.FRAMES_PER_CHUNK and \
            num_frames != geometry.round_frames(num_frames):
        rounded = geometry.round_frames(num_frames)
        logger.warning("num_frames %d is not a multiple of %d; using %d", num_frames,
                                            geometry.FRAMES_PER_CHUNK, rounded)
        options = {**options, "num_frames": rounded}
    preset = get_preset(options.get("preset") or ("ti2v" if has_image else "t2v"))
    overrides = {k: (float(v) if _OPTION_TYPES[k] is float and v is not None else v)
                 for k, v in options.items() if k != "preset"}
    return preset.with_overrides(**overrides)


def token_count(sampling: SamplingConfig) -> int:
    """DiT tokens per sample ``F * h * w`` for the (rounded) sampling sizes."""
    return geometry.token_count(sampling.height, sampling.width, sampling.num_frames)
