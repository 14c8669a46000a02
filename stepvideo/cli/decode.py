r"""Turn saved latents into the mp4: the same frames as the run that saved them.

    python -m stepvideo.decode results/cat.latents.safetensors --vae_url http://127.0.0.1:8080
    python -m stepvideo.decode results/cat.latents.safetensors --model_dir ckpts -o cat.mp4

When decoding or writing fails after the denoising loop (the VAE service is down, the disk is
full), ``StepVideoPipeline.write_video`` saves the final latents ``[B, F, C, h, w]`` next to the intended output as
``<name>.latents.safetensors`` (written atomically), with the prompt and the sampling and
output settings in its metadata. This command decodes them with the service (``--vae_url``,
uint8 frames converted on the server, as the generator does) or a local VAE
(``--model_dir``), applies the same post-processing and writes the mp4 (default: the path the
run intended). The file format is :mod:`stepvideo.vae.latents_file`; the decode and write are
:func:`stepvideo.vae.codec.latents_to_mp4`, shared with ``python -m stepvideo.vae decode``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..caption_service.client import RemoteVAE
from ..components import LocalVAE
from ..config import OutputConfig
from ..io.video import output_video_path
from ..loading import layout
from ..loading.hub import resolve_model_dir
from ..models.vae import AutoencoderKL
from ..process import run_main
from ..runtime.preflight import check_output, check_services
from ..vae.codec import latents_to_mp4
from ..vae.latents_file import load_latents, video_path_for

logger = logging.getLogger(__name__)


def remote_decoder(url: str, token: Optional[str] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The service's decode with uint8 output, as the generator uses it."""

    vae = RemoteVAE(url, token=token, output="uint8")
    return lambda latents: vae.decode(latents.detach().float().cpu())


def local_decoder(model_dir, device: Optional[str] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The decode of a local VAE from ``model_dir/vae``, as ``--no_service`` runs use it (float
    video on CPU; the VAE casts the latents to its device and dtype)."""
    root = resolve_model_dir(model_dir, allow_patterns=layout.SERVICE_PATTERNS)
    return LocalVAE(AutoencoderKL.from_pretrained(root / layout.VAE_DIR, device=device), output="float").decode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stepvideo.decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("latents", help="a <name>.latents.safetensors file saved by a failed run")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--vae_url", default=None, help="decode with the caption/VAE service at this address")
    source.add_argument("--model_dir", default=None, help="decode with the local VAE of this checkpoint")
    parser.add_argument("--service_token", default=None, help="the service's token (default: env "
                                                              "STEPVIDEO_SERVICE_TOKEN)")
    parser.add_argument("--device", default=None, help="device of the local VAE (default: cuda if available)")
    parser.add_argument("-o", "--output", default=None, help="mp4 path (default: the path the run intended)")
    parser.add_argument("--debug", action="store_true", help="print tracebacks with errors")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_main(lambda: _decode(args), debug=args.debug)


def _decode(args: argparse.Namespace) -> int:
    latents, metadata = load_latents(args.latents)
    settings = metadata.get("output") if isinstance(metadata.get("output"), dict) else {}
    out_path = Path(args.output or metadata.get("video_path") or video_path_for(args.latents))
    output = replace(OutputConfig(), output_path=str(out_path),
                     **{k: v for k, v in settings.items() if k in asdict(OutputConfig())})
    check_output(output)
    if args.vae_url:
        from types import SimpleNamespace

        check_services(SimpleNamespace(local=False, caption_url=None, vae_url=args.vae_url,
                                       service_token=args.service_token), only_vae=True)
        decode = remote_decoder(args.vae_url, args.service_token)
    else:
        decode = local_decoder(args.model_dir, args.device)
    out_path = output_video_path(output.save_path, "video", output_path=out_path)
    latents_to_mp4(decode, latents, out_path, output)
    print(out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
