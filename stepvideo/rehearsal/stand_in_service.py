"""The caption/VAE service "elsewhere" for a rank-0 rehearsal: the real server, answering shapes.

A generation with the service on another GPU sends its prompts and latents over HTTP. To
rehearse rank 0 of such a run, :func:`stand_in_service` starts the real service app
(:func:`~stepvideo.caption_service.server.create_app` behind its real HTTP host, on 127.0.0.1,
any free port) in a thread of this process, with stand-in models that answer the shapes and
dtypes the service's own rehearsal produced (:class:`~.service.ServiceAnswers`): zero
embeddings with an all-ones mask (the full text length, the memory worst case), zero latents
and a zero video. So rank 0 runs its real client, protocol, pre-flight checks and mp4 writer,
and what it receives lands on its fake device exactly as the real answers would.

The server thread makes real host tensors: the rehearsal's fake-tensor modes are per thread.

:func:`fake_tensors_sent_as_zeros`: rank 0's latents are fake tensors, which have no bytes to
put in a request body; while it is active the service client sends zeros of their shape and
dtype (after the same device-to-host copy, which the audit sees).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from ..caption_service import client as service_client
from ..caption_service.components import ServiceComponents
from ..caption_service.config import ServiceConfig
from ..caption_service.host import ServiceServer
from ..caption_service.server import create_app
from .service import PROMPTS, ServiceAnswers


class _Caption:
    """Answers ``embedding(prompts)`` with tensors of the recorded shapes (batch: the prompts)."""

    def __init__(self, answers: ServiceAnswers):
        self.specs = answers.caption

    def embedding(self, prompts) -> Dict[str, torch.Tensor]:
        out = {}
        for name, spec in self.specs.items():
            shape = (len(prompts), *spec.shape[1:])
            out[name] = torch.ones(shape, dtype=spec.dtype) if name == "y_mask" else torch.zeros(shape, dtype=spec.dtype)
        return out


class _VAE:
    """Answers ``decode`` and ``encode`` for the recorded input shapes; other shapes are refused
    with the shape the service was rehearsed for."""

    def __init__(self, answers: ServiceAnswers):
        self.answers = answers
        self.z_channels = int(answers.vae["z_channels"])
        self.in_channels = int(answers.vae["in_channels"])
        self.dtype = answers.vae["dtype"]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if tuple(z.shape) != self.answers.decode_samples:
            raise ValueError(f"the stand-in service was rehearsed to decode latents {list(self.answers.decode_samples)}, "
                             f"got {list(z.shape)}")
        return torch.zeros(self.answers.video.shape, dtype=self.answers.video.dtype)

    def encode(self, x: torch.Tensor, generator=None, mode: str = "sample") -> torch.Tensor:
        if self.answers.latents is None or tuple(x.shape) != self.answers.encode_videos:
            raise ValueError(f"the stand-in service was rehearsed to encode {self.answers.encode_videos}, "
                             f"got {list(x.shape)}")
        return torch.zeros(self.answers.latents.shape, dtype=self.answers.latents.dtype)


@contextlib.contextmanager
def stand_in_service(answers: ServiceAnswers, token: Optional[str] = None) -> Iterator[str]:
    """Serve :class:`_Caption` and :class:`_VAE` for ``answers``; yields the service's URL."""
    config = ServiceConfig(host="127.0.0.1", port=0, token=token, threads=2, max_prompts=len(PROMPTS) * 8)
    components = ServiceComponents(caption=_Caption(answers), vae=_VAE(answers),
                                   info={"stand_in": "benchmark/rehearse.py: shapes of the service rehearsal"})
    server = ServiceServer(create_app(components, config), config).start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.close()


@contextlib.contextmanager
def fake_tensors_sent_as_zeros() -> Iterator[None]:
    """See the module docstring."""
    encode = service_client.encode_tensors

    def encode_sendable(tensors, options=None) -> bytes:
        sendable = {}
        for name, tensor in tensors.items():
            if isinstance(tensor, FakeTensor):
                tensor.detach().to("cpu")               # the copy the real call makes (audited)
                with unset_fake_temporarily():
                    sendable[name] = torch.zeros(tensor.shape, dtype=tensor.dtype)
            else:
                sendable[name] = tensor
        with unset_fake_temporarily():
            return encode(sendable, options)

    service_client.encode_tensors = encode_sendable
    try:
        yield
    finally:
        service_client.encode_tensors = encode
