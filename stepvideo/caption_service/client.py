"""Clients of the caption/VAE service, with the same methods as the local models.

::

    caption = RemoteCaptionEncoder("127.0.0.1")            # == CaptionEncoder.embedding
    vae = RemoteVAE("http://gpu-host:8080", token=...)     # == AutoencoderKL.decode / encode
    out = caption.embedding([prompt + pos_magic, neg_magic])
    video = vae.decode(latents)                            # [B, T, 3, H, W] bf16, CPU
    frames = vae.decode(latents, output="uint8")           # same numbers as to_uint8_frames(video)

URLs: ``http://host:port``, ``https://...``, ``host:port`` or a bare ``host`` (port 8080, the
reference's fixed port); see :func:`normalize_service_url`. The token defaults to the
``STEPVIDEO_SERVICE_TOKEN`` environment variable.

Failures raise :class:`ServiceError` (``status`` = the HTTP status, message = the server's JSON
error) or its subclasses :class:`ServiceConnectionError` (server down, or the connection lost
mid-request) and :class:`ServiceTimeoutError`. Connection refusals and 503 answers are retried
with exponential backoff (honouring ``Retry-After``); a connection lost mid-request is not,
because re-sending the same work to a server that just died rarely helps.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import torch

from .. import geometry
from ..http_errors import read_error
from ..text_encoders.caption import check_prompts
from .config import DEFAULT_PORT, TOKEN_ENV
from .protocol import (FLOAT_DTYPES, JSON_CONTENT_TYPE, PROTOCOL_VERSION, TENSOR_CONTENT_TYPE, ProtocolError,
                       TensorMessage, check_tensor, decode_tensors, encode_json, encode_tensors, media_type)

logger = logging.getLogger(__name__)

__all__ = ["normalize_service_url", "ServiceError", "ServiceConnectionError", "ServiceTimeoutError",
           "ServiceClient", "RemoteCaptionEncoder", "RemoteVAE", "wait_ready"]

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def normalize_service_url(url: str, default_port: int = DEFAULT_PORT) -> str:
    """``"10.0.0.5"`` -> ``"http://10.0.0.5:8080"``; ``"host:9000"`` -> ``"http://host:9000"``;
    ``"http://host"`` -> ``"http://host:8080"``; ``"::1"`` / ``"[::1]"`` -> ``"http://[::1]:8080"``.

    A path (reverse-proxy prefix) is kept; trailing slashes are dropped. Only http and https
    are accepted.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"service URL must be a host name, host:port or http://host:port, got {url!r}")
    text = url.strip()
    match = _SCHEME.match(text)
    scheme = "http"
    if match:
        scheme = match.group(1).lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"service URL {url!r} must use http:// or https://, not {scheme}://")
        text = text[match.end():]
    netloc, slash, path = text.partition("/")
    path = (slash + path).rstrip("/")
    if not netloc:
        raise ValueError(f"service URL {url!r} has no host")
    if netloc.count(":") > 1 and not netloc.startswith("["):      # bare IPv6 literal
        host, port = f"[{netloc}]", None
    elif netloc.startswith("["):
        close = netloc.find("]")
        if close < 0:
            raise ValueError(f"service URL {url!r} has an unterminated IPv6 literal")
        host, rest = netloc[:close + 1], netloc[close + 1:]
        port = rest[1:] if rest.startswith(":") else None
        if rest and not rest.startswith(":"):
            raise ValueError(f"service URL {url!r}: unexpected {rest!r} after the IPv6 address")
    else:
        host, _, port = netloc.partition(":")
        port = port or None
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"service URL {url!r} has an invalid port {port!r}")
    if not host or any(c in host for c in " @?#"):
        raise ValueError(f"service URL {url!r} has an invalid host {host!r}")
    return f"{scheme}://{host}:{port or default_port}{path}"


class ServiceError(RuntimeError):
    """The service answered with an error (``status`` = HTTP status) or could not be used."""

    def __init__(self, message: str, status: Optional[int] = None, url: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.url = url


class ServiceConnectionError(ServiceError):
    """No server listening, or the connection dropped before the answer was complete."""


class ServiceTimeoutError(ServiceError):
    """The server accepted the request but did not answer within the read timeout."""


def _is_connect_failure(err: BaseException) -> bool:
    """True when the request never reached the server (refused, unreachable, DNS, connect timeout)."""
    import requests
    from urllib3.exceptions import ConnectTimeoutError, MaxRetryError

    if isinstance(err, requests.exceptions.ConnectTimeout):
        return True
    reason = err.args[0] if err.args else None
    if isinstance(reason, MaxRetryError):
        reason = reason.reason
    return isinstance(reason, ConnectTimeoutError)   # NewConnectionError / NameResolutionError included


def _error_message(body: bytes, content_type: str) -> str:
    """The server's ``{"error": ...}`` text, or a short excerpt of whatever else came back."""
    return read_error(body, content_type)[0]


class ServiceClient:
    """HTTP plumbing shared by the remote models: one connection pool per thread, retries, errors.

    Args:
        url: service base URL (see :func:`normalize_service_url`).
        token: shared token; default ``$STEPVIDEO_SERVICE_TOKEN``; None sends no header.
        timeout: seconds to wait for each answer (a queued decode on a busy GPU can take minutes).
        connect_timeout: seconds to establish the TCP connection.
        retries: extra attempts after a refused connection or a 503.
        backoff: first retry delay in seconds (doubles each time, capped by ``max_backoff``).
        name: what to call the service in messages ("caption service", "VAE service").
    """

    def __init__(self, url: str, token: Optional[str] = None, timeout: float = 1800.0,
                 connect_timeout: float = 10.0, retries: int = 3, backoff: float = 1.0,
                 max_backoff: float = 30.0, name: str = "stepvideo service"):
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError(f"timeouts must be > 0, got timeout={timeout}, connect_timeout={connect_timeout}")
        self.url = normalize_service_url(url)
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.name = name
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = requests.Session()
            session.trust_env = False     # never route the service through an environment proxy
            self._local.session = session
        return session

    def request(self, method: str, route: str, body: Optional[bytes] = None, content_type: Optional[str] = None,
                expect: str = TENSOR_CONTENT_TYPE, retry: bool = True) -> bytes:
        """Send one request and return the body of a 200 answer of type ``expect``."""
        import requests
        from urllib3.exceptions import HTTPError as Urllib3Error

        url = self.url + route
        headers = {"Accept": expect}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        attempts = self.retries + 1 if retry else 1
        for attempt in range(attempts):
            delay = min(self.backoff * 2 ** attempt, self.max_backoff)
            try:
                resp = self._session().request(method, url, data=body, headers=headers, stream=True,
                                               timeout=(self.connect_timeout, self.timeout))
                try:
                    data = resp.raw.read(decode_content=True)
                finally:
                    resp.close()
            except requests.exceptions.ConnectionError as err:
                if _is_connect_failure(err):
                    if attempt + 1 < attempts:
                        logger.warning("%s at %s not reachable (%s); retrying in %.1f s", self.name, self.url,
                                       type(err).__name__, delay)
                        time.sleep(delay)
                        continue
                    raise ServiceConnectionError(
                        f"cannot connect to the {self.name} at {self.url} ({_reason(err)}) after {attempts} "
                        "attempt(s). Is it running? Start it with `python api/call_remote_server.py "
                        "--model_dir <dir> --port <port>` and wait until GET /ready answers 200.",
                        url=url) from None
                raise self._lost(url, err) from None
            except requests.exceptions.Timeout as err:
                raise ServiceTimeoutError(f"the {self.name} at {url} did not answer within {self.timeout:g} s "
                                          f"({_reason(err)}); raise the client timeout for long decodes",
                                          url=url) from None
            except (Urllib3Error, OSError) as err:   # while reading the body
                raise self._lost(url, err) from None

            if resp.status_code == 503 and attempt + 1 < attempts:
                hint = resp.headers.get("Retry-After", "")
                wait = min(float(hint), self.max_backoff) if hint.isdigit() else delay
                logger.warning("%s busy (%s); retrying in %.1f s", self.name,
                               _error_message(data, resp.headers.get("Content-Type", "")), wait)
                time.sleep(wait)
                continue
            if resp.status_code != 200:
                message = _error_message(data, resp.headers.get("Content-Type", ""))
                if resp.status_code == 413 and body is not None and "--max_memory_gb" not in message:
                    message += (f" (this request body: {len(body)} bytes; the server's limit is set with "
                                "--max_body_mb and reported by GET /ready)")
                raise ServiceError(f"{self.name} at {url} answered HTTP {resp.status_code}: {message}",
                                   status=resp.status_code, url=url)
            got = media_type(resp.headers.get("Content-Type"))
            if got != expect:
                raise ServiceError(f"{self.name} at {url} answered with Content-Type {got or 'none'}, expected "
                                   f"{expect}: is this URL a stepvideo service (protocol {PROTOCOL_VERSION})?",
                                   status=resp.status_code, url=url)
            return data
        raise AssertionError("unreachable")   # pragma: no cover

    def _lost(self, url: str, err: BaseException) -> ServiceConnectionError:
        return ServiceConnectionError(
            f"the connection to the {self.name} at {url} was lost before the answer was complete "
            f"({_reason(err)}): the server may have crashed or been stopped; check its log", url=url)

    def post_tensors(self, route: str, body: bytes, content_type: str, names: Iterable[str]) -> TensorMessage:
        data = self.request("POST", route, body, content_type)
        try:
            return decode_tensors(data, expected_names=names)
        except ProtocolError as err:
            raise ServiceError(f"malformed answer from the {self.name} at {self.url}{route}: {err}",
                               status=200, url=self.url + route) from None

    def ready(self, retry: bool = False) -> Dict[str, Any]:
        """``GET /ready`` as a dict; :class:`ServiceError` (status 503) while the models load."""
        import json

        return json.loads(self.request("GET", "/ready", expect=JSON_CONTENT_TYPE, retry=retry).decode("utf-8"))


def _reason(err: BaseException) -> str:
    """The innermost readable cause of a requests/urllib3 error."""
    seen = err
    while seen.args and isinstance(seen.args[0], BaseException):
        seen = seen.args[0]
    if hasattr(seen, "reason") and isinstance(seen.reason, BaseException):
        seen = seen.reason
    for arg in getattr(seen, "args", ()):
        if isinstance(arg, BaseException):
            seen = arg
    text = str(seen)
    return f"{type(seen).__name__}: {text}" if text else type(seen).__name__


# ----------------------------------------------------------------------------------------
# Remote models
# ----------------------------------------------------------------------------------------

class RemoteCaptionEncoder:
    """:class:`~stepvideo.text_encoders.caption.CaptionEncoder` served by ``POST /caption-api``.

    ``embedding(prompts)`` returns the same dict as the local encoder (CPU tensors):
    ``y [B, L, H_llm]`` bf16, ``y_mask [B, 77 + L]`` int64, ``clip_embedding [B, 77, H_clip]`` bf16.
    Keyword arguments go to :class:`ServiceClient` (token, timeout, retries, ...).
    """

    def __init__(self, url: str, token: Optional[str] = None, **client_kwargs):
        client_kwargs.setdefault("timeout", 600.0)
        self.client = ServiceClient(url, token=token, name="caption service", **client_kwargs)

    def __repr__(self) -> str:
        return f"RemoteCaptionEncoder({self.client.url!r})"

    def embedding(self, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        prompts = check_prompts(prompts)
        body = encode_json({"protocol": PROTOCOL_VERSION, "prompts": prompts})
        msg = self.client.post_tensors("/caption-api", body, JSON_CONTENT_TYPE, ["y", "y_mask", "clip_embedding"])
        return msg.tensors


class RemoteVAE:
    """:class:`~stepvideo.models.vae.AutoencoderKL` served by ``/vae-api`` and ``/vae-encode-api``.

    Args:
        url, token, **client_kwargs: see :class:`ServiceClient`.
        output: default of :meth:`decode`: ``"float"`` (the VAE dtype, bf16) or ``"uint8"``
            (converted on the server with :func:`stepvideo.io.frames.to_uint8_frames`: half the
            bytes on the wire, same numbers).
    """

    frame_len = geometry.FRAMES_PER_CHUNK
    latent_len = geometry.LATENTS_PER_CHUNK
    spatial_compression = geometry.SPATIAL_COMPRESSION
    temporal_compression = geometry.TEMPORAL_COMPRESSION
    scaling_factor = 1.0

    def __init__(self, url: str, token: Optional[str] = None, output: str = "float", **client_kwargs):
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        self.output = output
        self.client = ServiceClient(url, token=token, name="VAE service", **client_kwargs)
        self._info: Optional[Dict[str, Any]] = None

    def __repr__(self) -> str:
        return f"RemoteVAE({self.client.url!r}, output={self.output!r})"

    def _ready_vae(self) -> Dict[str, Any]:
        if self._info is None:
            info = self.client.ready(retry=True)
            if not info.get("vae"):
                raise ServiceError(f"the service at {self.client.url} does not host a VAE", url=self.client.url)
            self._info = info["vae"]
        return self._info

    @property
    def z_channels(self) -> int:
        """Latent channels of the served VAE (asks ``/ready`` once)."""
        return int(self._ready_vae()["z_channels"])

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self._ready_vae()["dtype"])

    def decode(self, z: torch.Tensor, output: Optional[str] = None) -> torch.Tensor:
        """Latents ``z [B, F, C, h, w]`` (float32/bf16/fp16, any device) -> video ``[B, T, 3, 16h, 16w]``
        on CPU: the VAE dtype (``output="float"``) or uint8 pixel values (``output="uint8"``)."""
        output = output or self.output
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        body = encode_tensors({"samples": z}, {"output": output})
        video = self.client.post_tensors("/vae-api", body, TENSOR_CONTENT_TYPE, ["video"]).tensors["video"]
        dtypes = (torch.uint8,) if output == "uint8" else FLOAT_DTYPES
        return self._checked("video", video, dtypes, sizes={0: z.shape[0]} if z.ndim == 5 else None)

    def encode(self, x: torch.Tensor, generator: Optional[torch.Generator] = None, mode: str = "sample",
               seed: Optional[int] = None) -> torch.Tensor:
        """Video ``x [B, T, 3, H, W]`` in [-1, 1] -> latents ``[B, F, C, H/16, W/16]`` (VAE dtype, CPU).

        ``mode="sample"`` draws from the posterior on the server: with ``seed`` (or a seed drawn
        from ``generator``) the draw is reproducible and equals the local
        ``AutoencoderKL.encode(x, seed=seed)``; with neither the server's global RNG is used,
        like the reference. ``mode="mean"`` returns the posterior mean.
        """
        if mode not in ("sample", "mean"):
            raise ValueError(f"mode must be 'sample' or 'mean', got {mode!r}")
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator to encode, not both")
        if seed is None and generator is not None and mode == "sample":
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device))
        body = encode_tensors({"videos": x}, {"mode": mode, "seed": seed})
        latents = self.client.post_tensors("/vae-encode-api", body, TENSOR_CONTENT_TYPE, ["latents"]).tensors["latents"]
        return self._checked("latents", latents, FLOAT_DTYPES, sizes={0: x.shape[0]} if x.ndim == 5 else None)

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic encode: the posterior mean."""
        return self.encode(x, mode="mean")

    def _checked(self, name: str, tensor: torch.Tensor, dtypes, sizes) -> torch.Tensor:
        try:
            return check_tensor(name, tensor, ndim=5, sizes=sizes, dtypes=dtypes, finite=False)
        except ProtocolError as err:
            raise ServiceError(f"malformed answer from the VAE service at {self.client.url}: {err}",
                               status=200, url=self.client.url) from None


READY_TIMEOUT_S = 540.0
"""The one readiness timeout: how long a caller waits for a caption/VAE service to answer
``GET /ready`` while it starts and loads its models (503). The 30B text encoders take minutes to
load; 540 s stays under the default ``--dist_timeout`` (600 s), during which the other ranks wait
in a collective (the command line caps it at 0.9 x ``--dist_timeout``). Used by the pre-flight of
``run_parallel.py`` (``RuntimeConfig.service_wait``), by ``--serve`` and by :func:`wait_ready`."""


def wait_ready(url: str, token: Optional[str] = None, timeout: float = READY_TIMEOUT_S, interval: float = 0.5,
               abort: Optional[Callable[[], Optional[str]]] = None, *, connect_timeout: Optional[float] = None,
               client: Optional["ServiceClient"] = None) -> Dict[str, Any]:
    """Poll ``GET /ready`` until it answers 200 and return its JSON: the one readiness wait.

    Waits up to ``timeout`` seconds while the service loads (503) and up to ``connect_timeout``
    (default: ``timeout``) while the connection is refused (a service started a moment ago).
    ``abort``: called between polls; a non-empty string return stops waiting with that reason
    (e.g. "server process exited with code 1"). Raises :class:`ServiceError` (the last answer's,
    or :class:`ServiceTimeoutError`) when the time is up, and at once for answers that will not
    change (401, 404, a failed model load). ``client``: a configured :class:`ServiceClient` to poll.
    """
    client = client or ServiceClient(url, token=token, retries=0, timeout=max(interval, 5.0), name="service")
    start = time.monotonic()
    connect_timeout = timeout if connect_timeout is None else connect_timeout
    overall = max(timeout, connect_timeout)
    last = "no answer yet"
    told = False
    while True:
        try:
            return client.ready()
        except ServiceConnectionError as err:
            last = str(err)
            if connect_timeout < overall and time.monotonic() - start >= connect_timeout:
                raise
        except ServiceError as err:
            if err.status != 503:
                raise
            last = str(err)
            if timeout < overall and time.monotonic() - start >= timeout:
                raise
            if not told:
                logger.info("%s is still loading its models; waiting up to %.0f s", client.url, timeout)
                told = True
        reason = abort() if abort is not None else None
        if reason:
            raise ServiceError(f"stopped waiting for {client.url}/ready: {reason}", url=client.url)
        if time.monotonic() - start >= overall:
            raise ServiceTimeoutError(f"{client.url} was not ready after {overall:g} s; last: {last}", url=client.url)
        time.sleep(interval)
