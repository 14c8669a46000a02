"""bf16 drift of the DiT between two checkouts of stepvideo (tiny model, fixed random inputs).

    PYTHONPATH=/path/to/old python benchmark/bench_bf16_drift.py dump old.pt
    PYTHONPATH=.            python benchmark/bench_bf16_drift.py dump new.pt
    python benchmark/bench_bf16_drift.py compare old.pt new.pt

``dump`` runs a 4-layer tiny DiT (T2V and TI2V, 3x8x8 latent grid, CFG batch 2) in fp32 and in
bf16 with the ``stepvideo`` found on ``PYTHONPATH`` and saves the outputs. ``compare`` prints,
per variant: fp32 max |new - old|; the share of bf16 outputs that are bit-identical and the
max |new - old| in bf16; and each side's bf16 error against its own fp32 output (the fp32
model stands in for the reference, which is not shipped).
"""
from __future__ import annotations

import argparse
import sys

import torch


def dump(path: str) -> None:
    import stepvideo
    from stepvideo.models.dit import StepVideoModel
    from stepvideo.testing.init import init_random_weights
    from stepvideo.testing.tiny import TINY

    torch.set_num_threads(1)
    out = {}
    for variant in ("t2v", "ti2v"):
        config = {**TINY.transformer_config(variant), "num_layers": 4}
        base = init_random_weights(StepVideoModel.from_config(config, attention_backend="sdpa"), seed=0).eval()
        g = torch.Generator().manual_seed(1)
        f, h, w, z = 3, 8, 8, TINY.z_channels
        mask = torch.ones(2, 10)
        mask[1, 7:] = 0
        inputs = dict(hidden_states=torch.randn(2, f, z, h, w, generator=g),
                      encoder_hidden_states=torch.randn(2, 6, TINY.llm_hidden, generator=g),
                      encoder_hidden_states_2=torch.randn(2, 4, TINY.clip_hidden, generator=g),
                      timestep=torch.tensor([0.7, 0.7]), encoder_attention_mask=mask, return_dict=False)
        if variant == "ti2v":
            inputs.update(condition_hidden_states=torch.randn(2, f, z, h, w, generator=g), motion_score=2.0)
        for dtype in (torch.float32, torch.bfloat16):
            model = base.to(dtype).requires_grad_(False)
            cast = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "encoder_attention_mask"
                    else v for k, v in inputs.items()}
            with torch.no_grad():
                out[f"{variant}_{str(dtype).split('.')[-1]}"] = model(**cast).clone()
    torch.save(out, path)
    print(f"{stepvideo.__file__}: wrote {path}")


def compare(old_path: str, new_path: str) -> None:
    old, new = torch.load(old_path), torch.load(new_path)
    for variant in ("t2v", "ti2v"):
        f_old, f_new = old[f"{variant}_float32"], new[f"{variant}_float32"]
        b_old, b_new = old[f"{variant}_bfloat16"].float(), new[f"{variant}_bfloat16"].float()
        same = float((b_old == b_new).float().mean()) * 100
        err_old, err_new = (b_old - f_old).abs(), (b_new - f_new).abs()
        print(f"{variant}: std(out) {float(f_old.std()):.3f}"
              f" | fp32 max|new-old| {float((f_new - f_old).abs().max()):.3g}"
              f" | bf16 bit-identical {same:.1f}%, max|new-old| {float((b_new - b_old).abs().max()):.3g}"
              f" | bf16 vs fp32: old max {float(err_old.max()):.4f} mean {float(err_old.mean()):.5f},"
              f" new max {float(err_new.max()):.4f} mean {float(err_new.mean()):.5f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump", help="run the tiny DiT with the stepvideo on PYTHONPATH and save its outputs")
    d.add_argument("out")
    c = sub.add_parser("compare", help="compare two dumps")
    c.add_argument("old")
    c.add_argument("new")
    args = p.parse_args(argv)
    if args.command == "dump":
        dump(args.out)
    else:
        compare(args.old, args.new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
