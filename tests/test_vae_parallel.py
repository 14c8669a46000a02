"""Rank-split VAE decode (``stepvideo.models.vae_rank_split``): 2 gloo ranks on CPU must give
exactly the single-process result."""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from stepvideo.models.vae import AutoencoderKL
from stepvideo.models.vae_rank_split import chunk_share
from stepvideo.testing.tiny import TINY
from stepvideo.testing.tiny_vae import write_tiny_vae
from stepvideo.parallel.launch import free_port

WORLD = 2




def _worker(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        z = load_file(f"{folder}/inputs.safetensors")["z"]
        vae = AutoencoderKL.from_pretrained(f"{folder}/vae", dtype=torch.float32, world_size=WORLD)
        outputs = {"fp32": vae.decode(z)}
        vae.to(torch.bfloat16)                                                # byte transport on gloo
        outputs["bf16"] = vae.decode(z)
        save_file(outputs, f"{folder}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_chunk_share():
    assert [list(chunk_share(3, 2, r)) for r in range(2)] == [[0, 1], [2]]
    assert [list(chunk_share(1, 2, r)) for r in range(2)] == [[0], []]
    assert [list(chunk_share(4, 2, r)) for r in range(2)] == [[0, 1], [2, 3]]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_rank_split_decode_equals_single_process(tmp_path):
    write_tiny_vae(tmp_path / "vae", TINY, seed=7)
    # batch 2 and 7 latents: chunks of 3, 3 and 1 -> uneven split, short last chunk, seams
    z = torch.randn(2, 7, TINY.z_channels, 2, 2, generator=torch.Generator().manual_seed(0))
    save_file({"z": z}, str(tmp_path / "inputs.safetensors"))

    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae", dtype=torch.float32)
    expected = {"fp32": vae.decode(z)}
    expected["bf16"] = vae.to(torch.bfloat16).decode(z)
    assert expected["fp32"].shape == (2, 17 + 17 + 1, 3, 32, 32)
    for rank in range(WORLD):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        for name, value in expected.items():
            assert torch.equal(got[name], value), f"rank {rank} {name} differs from the single-process decode"
