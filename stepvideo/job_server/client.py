"""Client of the generation server (``run_parallel.py --serve``; see docs/server.md).

Python::

    from stepvideo.job_server.client import VideoClient
    client = VideoClient("http://127.0.0.1:8000")            # token: argument or $STEPVIDEO_SERVER_TOKEN
    job = client.submit("a cat walks on the moon", seed=7, num_inference_steps=30)
    job = client.wait(job["id"])                              # tqdm progress bar; raises JobFailed
    client.download(job["id"], "cat.mp4")

Command line (submit, wait with a progress bar, download; prints the mp4's path)::

    python -m stepvideo.client "a cat walks on the moon" --server http://127.0.0.1:8000 -o cat.mp4 --seed 7

Failures raise :class:`ServerError` (``status`` = the HTTP status, message = the server's
``error.message``); a job that ends ``failed`` or ``cancelled`` raises :class:`JobFailed`.
Any OpenAI-style client works too (docs/server.md, "Use it from the OpenAI SDK / LiteLLM").
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Union

from ..caption_service.client import normalize_service_url
from ..http_errors import error_message, read_error
from ..io.atomic import atomic_write_bytes
from .config import DEFAULT_PORT, TOKEN_ENV

__all__ = ["VideoClient", "ServerError", "JobFailed", "main"]

FINISHED = ("completed", "failed", "cancelled")


class ServerError(RuntimeError):
    """The server answered an error (``status``) or could not be reached (``status`` None)."""

    def __init__(self, message: str, status: Optional[int] = None, body: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.body = body or {}


class JobFailed(RuntimeError):
    """The job ended ``failed`` or ``cancelled``; ``job`` is its last state."""

    def __init__(self, job: Dict[str, Any]):
        reason = f": {error_message(job)}" if job.get("error") else ""
        super().__init__(f"job {job['id']} {job['status']}{reason}")
        self.job = job


class VideoClient:
    """Submit, watch, download, list and cancel jobs of one server."""

    def __init__(self, url: str = f"http://127.0.0.1:{DEFAULT_PORT}", token: Optional[str] = None,
                 timeout: float = 60.0):
        self.url = normalize_service_url(url, default_port=DEFAULT_PORT)
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self.timeout = timeout
        import requests

        self._session = requests.Session()
        self._session.trust_env = False

    def _request(self, method: str, route: str, **kwargs):
        import requests

        headers = kwargs.pop("headers", {})
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            resp = self._session.request(method, self.url + route, headers=headers, timeout=self.timeout, **kwargs)
        except requests.exceptions.RequestException as err:
            raise ServerError(f"cannot reach the generation server at {self.url}: {type(err).__name__}: {err}") \
                from None
        if resp.status_code >= 400:
            message, body = read_error(resp.content, resp.headers.get("Content-Type", ""), fallback=resp.reason)
            retry = resp.headers.get("Retry-After")
            hint = f" (retry after {retry} s)" if retry else ""
            raise ServerError(f"{method} {route} -> HTTP {resp.status_code}: {message}{hint}", resp.status_code, body)
        return resp

    # ------------------------------------------------------------------------------------
    def submit(self, prompt: str, image: Union[None, str, os.PathLike, bytes] = None, **fields) -> Dict[str, Any]:
        """Queue a job (``fields``: negative_prompt, height, width, num_frames, num_inference_steps,
        cfg_scale, time_shift, motion_score, seed, preset); ``image``: a path or PNG/JPEG bytes."""
        body = {"prompt": prompt, **{k: v for k, v in fields.items() if v is not None}}
        if image is not None:
            data = image if isinstance(image, bytes) else Path(image).read_bytes()
            body["image"] = base64.b64encode(data).decode("ascii")
        return self._request("POST", "/v1/videos", json=body).json()

    def get(self, job_id: str) -> Dict[str, Any]:
        return self._request("GET", f"/v1/videos/{job_id}").json()

    def list(self, limit: int = 20, after: Optional[str] = None, order: str = "desc") -> Dict[str, Any]:
        params = {"limit": limit, "order": order, **({"after": after} if after else {})}
        return self._request("GET", "/v1/videos", params=params).json()

    def iter_jobs(self, page: int = 100) -> Iterator[Dict[str, Any]]:
        """Every job, newest first."""
        after = None
        while True:
            answer = self.list(limit=page, after=after)
            yield from answer["data"]
            if not answer["has_more"]:
                return
            after = answer["last_id"]

    def cancel(self, job_id: str) -> Dict[str, Any]:
        """Cancel a queued or running job, or delete a finished one (``DELETE``)."""
        return self._request("DELETE", f"/v1/videos/{job_id}").json()

    def wait(self, job_id: str, poll: float = 0.5, timeout: Optional[float] = None, progress: bool = True,
             raise_on_failure: bool = True) -> Dict[str, Any]:
        """Poll until the job finishes; shows a tqdm bar of its progress (0..100 %) and stage.

        Each poll is a long poll (``?wait=poll``): the server answers as soon as the job finishes,
        or after ``poll`` seconds with its progress, so the end is seen at once."""
        from tqdm.auto import tqdm

        deadline = None if timeout is None else time.monotonic() + timeout
        bar = tqdm(total=100, desc=job_id[:18], unit="%", disable=not progress, dynamic_ncols=True,
                   bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix} [{elapsed}]")
        shown = 0
        try:
            while True:
                asked = time.monotonic()
                job = self._request("GET", f"/v1/videos/{job_id}", params={"wait": min(poll, 30.0)}).json()
                value = int(job.get("progress", 0))
                if value > shown:
                    bar.update(value - shown)
                    shown = value
                bar.set_postfix_str(job.get("stage") or job["status"], refresh=True)
                if job["status"] in FINISHED:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:g} s")
                if time.monotonic() - asked < poll / 2:        # the server did not hold the poll
                    time.sleep(poll)
        finally:
            bar.close()
        if raise_on_failure and job["status"] != "completed":
            raise JobFailed(job)
        return job

    def download(self, job_id: str, path: Union[str, os.PathLike]) -> Path:
        """Write a completed job's mp4 to ``path`` (atomically) and return the path."""

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_bytes(path, self._request("GET", f"/v1/videos/{job_id}/content").content)

    def generate(self, prompt: str, path: Union[str, os.PathLike], progress: bool = True, poll: float = 0.5,
                 **fields) -> Path:
        """submit + wait + download."""
        job = self.submit(prompt, **fields)
        self.wait(job["id"], poll=poll, progress=progress)
        return self.download(job["id"], path)

    def health(self) -> Dict[str, Any]:
        return self._request("GET", "/health").json()

    def ready(self) -> Dict[str, Any]:
        return self._request("GET", "/ready").json()

    def wait_ready(self, timeout: float = 600.0, interval: float = 0.5,
                   abort: Optional[Callable[[], Optional[str]]] = None) -> Dict[str, Any]:
        """Poll ``GET /ready`` until 200 (the DiT is loaded); ``abort()`` returning a reason stops early.
        Raises :class:`ServerError` at once for answers that will not change (401, 404)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.ready()
            except ServerError as err:
                if err.status not in (None, 502, 503, 504):
                    raise
                last = str(err)
            reason = abort() if abort is not None else None
            if reason:
                raise ServerError(f"stopped waiting for {self.url}/ready: {reason}")
            if time.monotonic() >= deadline:
                raise ServerError(f"{self.url} was not ready after {timeout:g} s; last: {last}")
            time.sleep(interval)


# ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stepvideo.client",
                                description="Generate one video on a running generation server "
                                            "(run_parallel.py --serve): submit, wait, download.")
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("--server", default=f"http://127.0.0.1:{DEFAULT_PORT}", help="server URL (default %(default)s)")
    p.add_argument("-o", "--output", default=None, help="mp4 path (default: <job id>.mp4)")
    p.add_argument("--token", default=None, help=f"server token (default ${TOKEN_ENV})")
    p.add_argument("--image", default=None, help="TI2V: the first frame (PNG/JPEG)")
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--preset", default=None)
    for name in ("height", "width", "num_frames", "num_inference_steps", "seed"):
        p.add_argument(f"--{name}", type=int, default=None)
    for name in ("cfg_scale", "time_shift", "motion_score"):
        p.add_argument(f"--{name}", type=float, default=None)
    p.add_argument("--poll", type=float, default=0.5, help="seconds between status polls (default %(default)s)")
    p.add_argument("--no_wait", action="store_true", help="print the queued job's JSON and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    fields = {k: getattr(args, k) for k in ("negative_prompt", "preset", "height", "width", "num_frames",
                                            "num_inference_steps", "seed", "cfg_scale", "time_shift", "motion_score")}
    try:
        client = VideoClient(args.server, token=args.token)
        job = client.submit(args.prompt, image=args.image, **fields)
        if args.no_wait:
            print(json.dumps(job, ensure_ascii=False, indent=2))
            return 0
        print(f"queued {job['id']} (seed {job['settings']['seed']})", file=sys.stderr)
        job = client.wait(job["id"], poll=args.poll, progress=not args.quiet)
        path = client.download(job["id"], args.output or f"{job['id']}.mp4")
    except (ServerError, JobFailed, TimeoutError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(job["timings"].get("summary", ""), file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
