"""Resolve a model location: a local folder, or a Hugging Face Hub repo id.

``huggingface_hub`` is imported only when a repo id is actually given, so offline users
with local checkpoints never need it.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def looks_like_repo_id(spec: str) -> bool:
    """``org/name`` with no such local path: treat as a Hub repo id."""
    return bool(_REPO_ID.match(spec)) and not Path(spec).exists()


def resolve_model_dir(spec: os.PathLike | str, allow_patterns: Optional[Sequence[str]] = None,
                      revision: Optional[str] = None, cache_dir: Optional[str] = None) -> Path:
    """Return a local folder for ``spec``.

    A local path is returned as is (it must exist). A repo id such as
    ``stepfun-ai/stepvideo-t2v`` is downloaded (only ``allow_patterns``) with
    ``huggingface_hub.snapshot_download``; offline or without the package, the error says
    how to get the files.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"model dir {text!r} is a file, expected a folder")
        return path
    if not looks_like_repo_id(text):
        raise FileNotFoundError(f"model dir not found: {text!r} (neither a folder nor a Hub repo id like "
                                "'stepfun-ai/stepvideo-t2v')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise FileNotFoundError(
            f"{text!r} is not a local folder and looks like a Hub repo id, but huggingface_hub is not "
            "installed: `pip install huggingface_hub`, or download the checkpoint and pass its folder") from err
    logger.info("downloading %s (%s) from the Hugging Face Hub", text, ", ".join(allow_patterns or ["all"]))
    try:
        local = snapshot_download(repo_id=text, allow_patterns=list(allow_patterns) if allow_patterns else None,
                                  revision=revision, cache_dir=cache_dir)
    except Exception as err:  # huggingface_hub raises many types (offline, 404, auth)
        raise FileNotFoundError(
            f"could not download {text!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "If this machine is offline, download the checkpoint elsewhere "
            f"(`huggingface-cli download {text} --local-dir ckpts`) and pass the local folder.") from err
    return Path(local)
