"""Checks that run on rank 0 before any weight is read, so a run that cannot succeed fails in seconds.

    preflight(runtime, sampling, output, parallel, first_image="cat.png")   # raises PreflightError

Each check raises :class:`~stepvideo.errors.PreflightError` with one line naming the flag, the
value seen and the rule: the output target (writable, not a directory), the first image
(exists, is a file, decodes, has a pixel format we can convert; a conversion, an upscale or a
large crop is logged as one warning line each), the checkpoint kind against the image (an image with a T2V
checkpoint, or no image with a TI2V one), the sampling settings against the layout, and the
caption/VAE services (``GET /ready`` with the token, the needed models loaded). A prompt longer
than the text encoders read is reported in one warning line (it runs as the reference runs it).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

from ..caption_service.client import ServiceClient, ServiceError, wait_ready
from ..errors import PreflightError
from ..geometry import round_size
from ..io.image import describe_fit, to_rgb
from ..loading import layout
from ..loading.hub import looks_like_repo_id
from ..perf.memory_profiles import check_host
from ..text_encoders.prompt_length import check_prompt_length

logger = logging.getLogger(__name__)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_creatable_dir(folder: Path, flag: str) -> None:
    if folder.exists() and not folder.is_dir():
        raise PreflightError(f"{flag} {str(folder)!r} is a file; expected a folder")
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise PreflightError(f"{flag} {str(folder)!r} cannot be created: {str(base)!r} is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise PreflightError(f"{flag} {str(folder)!r} is not writable (no write permission on {str(base)!r})")


def check_output(output) -> None:
    """``--output_path`` is a writable file path (not a folder); ``--save_path`` a writable folder."""
    if output.output_path:
        path = Path(output.output_path)
        if path.is_dir():
            raise PreflightError(f"--output_path {str(path)!r} is a directory; pass a file path such as "
                                 f"{str(path / 'video.mp4')!r}, or use --save_path for a folder")
        if path.exists() and not os.access(path, os.W_OK):
            raise PreflightError(f"--output_path {str(path)!r} exists and is not writable")
        _check_creatable_dir(path.parent, "the folder of --output_path")
    else:
        _check_creatable_dir(Path(output.save_path), "--save_path")


def check_first_image(path, height: Optional[int] = None, width: Optional[int] = None) -> None:
    """The image exists, is a file, decodes as an image and converts to RGB; with the target
    ``height``/``width``, says (one warning line) how it will be upscaled or cropped."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise PreflightError(f"--first_image_path {str(p)!r}: no such file")
    if p.is_dir():
        raise PreflightError(f"--first_image_path {str(p)!r} is a directory; expected an image file")
    from PIL import Image, UnidentifiedImageError

    note = refusal = None
    try:
        with Image.open(p) as img:
            img.load()
            size = img.size
            try:
                _, note = to_rgb(img)
            except ValueError as err:
                refusal = str(err)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise PreflightError(f"--first_image_path {str(p)!r} cannot be read as an image ({err})") from None
    if refusal:
        raise PreflightError(f"--first_image_path {str(p)!r} {refusal}")
    if note:
        logger.warning("--first_image_path %r %s", str(p), note)
    fit = describe_fit(*size, height, width) if height and width else None
    if fit:
        logger.warning("--first_image_path %r: %s", str(p), fit)


def checkpoint_kind(model_dir) -> Optional[str]:
    """``"t2v"`` / ``"ti2v"`` from ``transformer/config.json`` of a local folder; None for a Hub id."""
    root = Path(model_dir).expanduser()
    if not root.exists():
        if looks_like_repo_id(str(model_dir)):
            return None            # checked after the download, before the weights are read
        raise PreflightError(f"--model_dir {str(model_dir)!r}: no such folder (and not a Hub repo id like "
                             "'stepfun-ai/stepvideo-t2v')")
    if not root.is_dir():
        raise PreflightError(f"--model_dir {str(model_dir)!r} is a file; expected the checkpoint folder")
    config_path = root / layout.TRANSFORMER_DIR / layout.TRANSFORMER_CONFIG
    if not config_path.is_file():
        raise PreflightError(f"--model_dir {str(model_dir)!r} has no {layout.TRANSFORMER_DIR}/"
                             f"{layout.TRANSFORMER_CONFIG}: is it a Step-Video checkpoint folder?")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PreflightError(f"{str(config_path)!r} is not valid JSON ({err})") from None
    return "ti2v" if config.get("use_additional_conditions") else "t2v"


def check_kind(model_dir, has_image: bool, kind: Optional[str] = None) -> None:
    """An image needs a TI2V checkpoint and a TI2V checkpoint needs an image."""
    kind = kind if kind is not None else checkpoint_kind(model_dir)
    if kind is None:
        return
    if has_image and kind == "t2v":
        raise PreflightError(f"a first image was given (--first_image_path), but --model_dir {str(model_dir)!r} "
                             "is a text-to-video (T2V) checkpoint; use a Step-Video-TI2V checkpoint or drop the image")
    if not has_image and kind == "ti2v":
        raise PreflightError(f"--model_dir {str(model_dir)!r} is an image-to-video (TI2V) checkpoint: pass "
                             "--first_image_path (or use a T2V checkpoint)")


def check_sampling(sampling, parallel) -> None:
    """Settings that are valid alone but not together with the layout."""
    if parallel is not None and parallel.cfg_degree > 1 and sampling.guidance_scale <= 1:
        raise PreflightError(f"--cfg_parallel needs classifier-free guidance (--cfg_scale > 1), got --cfg_scale "
                             f"{sampling.guidance_scale:g}; drop --cfg_parallel")


def check_services(runtime, needs_vae_encode: bool = False, timeout: float = 10.0, only_vae: bool = False,
                   loading_wait: Optional[float] = None, connect_wait: float = 10.0) -> None:
    """Both services answer ``GET /ready`` with our token and serve the models we need.

    ``loading_wait``: seconds to wait for a service that is still loading (default
    ``runtime.service_wait``, else 0).
    """
    if runtime.local:
        return

    if loading_wait is None:
        loading_wait = float(getattr(runtime, "service_wait", 0.0))

    wanted = [] if only_vae else [("caption", "--caption_url", runtime.caption_url, "caption")]
    wanted.append(("VAE", "--vae_url", runtime.vae_url, "vae_decode"))
    if needs_vae_encode:
        wanted.append(("VAE", "--vae_url", runtime.vae_url, "vae_encode"))
    answers = {}
    for name, flag, url, route in wanted:
        key = (flag, url)
        if key not in answers:
            client = ServiceClient(url, token=runtime.service_token, retries=0, timeout=timeout,
                                   connect_timeout=min(timeout, 5.0), name=f"{name} service")
            try:
                answers[key] = wait_ready(url, timeout=loading_wait, interval=1.0, connect_timeout=connect_wait,
                                          client=client)
            except ServiceError as err:
                raise PreflightError(f"{flag} {url}: {err}") from None
        routes = answers[key].get("routes") or {}
        if not routes.get(route):
            raise PreflightError(f"{flag} {url}: the service does not serve the {route.replace('_', ' ')} model "
                                 f"(started with --no_{'caption' if route == 'caption' else 'vae'}?)")


def preflight(runtime, sampling, output, parallel=None, first_image=None, check_output_target: bool = True,
              prompt: Optional[str] = None) -> None:
    """Every check above, cheapest first; with ``prompt``, its length against the text encoders."""
    check_sampling(sampling, parallel)
    if check_output_target:
        check_output(output)
    check_first_image(first_image, round_size(sampling.height), round_size(sampling.width))
    check_kind(runtime.model_dir, has_image=first_image is not None)
    if prompt is not None:
        check_prompt_length(runtime.model_dir, prompt, sampling.pos_magic)
    check_services(runtime, needs_vae_encode=first_image is not None)
    check_host(runtime, sampling, parallel)           # the profile's host peak against the RAM
