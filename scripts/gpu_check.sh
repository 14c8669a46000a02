#!/usr/bin/env bash
# Measured GPU memory against the CPU accounting (stepvideo/perf/memory_accounting.py).
#
#   bash scripts/gpu_check.sh            # one CUDA GPU (H100 80 GB or H200), random weights, <= 8 minutes
#
# 1. One real-width DiT block (width 6144, 48 heads) at the full token count (544x992x204 = 75,888
#    tokens, CFG batch 2), bf16 and fp8: torch.cuda.max_memory_allocated vs the traced peak.
# 2. The 80g profile end to end, stage by stage, with random weights: Step-LLM + CLIP encode, the
#    48-layer DiT step with every block resident, the DiT off the device (to host memory) and the
#    VAE decode of the whole latent. Each stage's max_memory_allocated vs the profile report.
# 3. The rehearsal's last line, measured: benchmark/rehearse.py's run (80g, 544x992x204 T2V, 2 steps,
#    the shape-only folder's zero weights) on fake CUDA, then the same run and audit on this GPU
#    (--on_gpu); the two lines carry the same fields (peak_gib, mixed_device_ops, host_syncs_per_step,
#    h2d_gib_per_step) and compare field by field.
# 4. The same for the caption/VAE service on its own GPU: benchmark/rehearse.py --service (the prompt
#    embedding and the full-size 204-frame decode, zero weights) on fake CUDA, then --on_gpu.
# Prints one line per comparison: measured GiB, accounted GiB, ratio. Needs 80 GiB of device memory
# and ~64 GiB of host memory (the DiT is parked on the host while the VAE decodes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
timeout 480 "$PY" - <<'EOF'
import time

import torch

from stepvideo.perf.memory_profiles import PROFILES, Placement
from stepvideo.models.dit import StepVideoModel
from stepvideo.perf import memory_accounting as acc
from stepvideo.perf import memory_report
from stepvideo.testing.init import init_random_weights

if not torch.cuda.is_available():
    raise SystemExit("error: scripts/gpu_check.sh needs a CUDA GPU")
dev = torch.device("cuda")
G = 2 ** 30
start = time.time()
print(f"device: {torch.cuda.get_device_name(dev)}, {torch.cuda.get_device_properties(dev).total_memory / G:.1f} GiB")
video = acc.VideoShape()
f, h, w = video.latent


def compare(name, measured, accounted):
    print(f"{name:<42} measured {measured / G:8.2f} GiB   accounted {accounted / G:8.2f} GiB   "
          f"ratio {measured / accounted:6.3f}   [{time.time() - start:5.0f} s]", flush=True)


def peak_of(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), out


def random_dit(layers, device, fp8=False):
    with torch.device("meta"):
        model = StepVideoModel(num_layers=layers, attention_backend="auto")
    model = model.to_empty(device=device)
    init_random_weights(model, seed=0)
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    if fp8:
        from stepvideo.fp8_linear import quantize_blocks
        quantize_blocks(model)
    return model


def step_inputs(batch=2):
    latents = torch.randn(1, f, 64, h, w, device=dev, dtype=torch.bfloat16)
    y = torch.randn(batch, 320, 6144, device=dev, dtype=torch.bfloat16)
    clip = torch.randn(batch, 77, 1024, device=dev, dtype=torch.bfloat16)
    return latents, y, clip


@torch.no_grad()
def one_step(model, latents, y, clip):
    x = torch.cat([latents, latents])
    t = torch.full((2,), 0.5, device=dev, dtype=torch.bfloat16)
    out = model(hidden_states=x, timestep=t, encoder_hidden_states=y, encoder_hidden_states_2=clip, return_dict=False)
    del x
    cond, uncond = out.chunk(2)
    guided = uncond + 9.0 * (cond - uncond)
    del out, cond, uncond
    return latents.float() + 0.01 * guided.float()


# ---- 1. one block at the full token count ---------------------------------------------------
for fp8 in (False, True):
    predicted = acc.measure_step(video, fp8=fp8, layers=1, total_layers=1)
    model = random_dit(1, dev, fp8=fp8)
    inputs = step_inputs()
    measured, _ = peak_of(lambda: one_step(model, *inputs))
    compare(f"1 block, 75,888 tokens x 2, {'fp8' if fp8 else 'bf16'}", measured, predicted.peak)
    del model, inputs
    torch.cuda.empty_cache()

# ---- 2. the 80g profile end to end ----------------------------------------------------------
profile = PROFILES["80g"]
report = memory_report.profile_report(profile, video)
accounted = {s.stage: s.allocated for s in report.stages}

from stepvideo.text_encoders.step_llm import Step1Config, Step1Model          # noqa: E402
from transformers import BertConfig, BertModel                                 # noqa: E402

with torch.device("meta"):
    llm = Step1Model(Step1Config())
    bert = BertModel(BertConfig(**acc.CLIP_BERT_CONFIG), add_pooling_layer=False)
llm = llm.to_empty(device=dev).to(torch.bfloat16)
bert = bert.to_empty(device=dev).float()
for m in (llm, bert):
    for p in m.parameters():
        p.data.normal_(0, 0.02)
ids = torch.randint(0, 65536, (2, 320), device=dev)
clip_ids = torch.randint(0, 47020, (2, 77), device=dev)
with torch.no_grad():
    measured, _ = peak_of(lambda: (llm(ids), bert(clip_ids).last_hidden_state))
compare("80g encode (Step-LLM + CLIP)", measured, accounted["encode"])
del llm, bert
torch.cuda.empty_cache()

model = random_dit(48, dev)
placement = Placement(profile, dev)
placement.prepare_dit(model)
placement.enter("denoise", model)           # all 48 blocks resident (80g streams none since the leaner step)
torch.cuda.empty_cache()
inputs = step_inputs()
measured, latents = peak_of(lambda: one_step(model, *inputs))
compare("80g step (48 layers resident)", measured, accounted["step"])
placement.enter("decode", model)            # the DiT leaves the device
del inputs
torch.cuda.empty_cache()

from stepvideo.models.vae import AutoencoderKL                                 # noqa: E402

with torch.device("meta"):
    vae = AutoencoderKL()
vae = vae.to_empty(device=dev)
init_random_weights(vae, seed=0)
vae = vae.to(torch.bfloat16).eval().requires_grad_(False)
z = latents.to(torch.bfloat16)
del latents
with torch.no_grad():
    measured, _ = peak_of(lambda: vae.decode(z))
compare("80g decode (whole latent, 3-latent chunks)", measured, accounted["decode"])
print(f"constants used by the accounting: context {acc.CUDA_CONTEXT_BYTES / G:.2f} GiB (compare nvidia-smi "
      f"minus torch.cuda.memory_reserved), allocator reserve {acc.ALLOCATOR_RESERVE:.0%}; reserved now "
      f"{torch.cuda.memory_reserved() / G:.2f} GiB, max reserved {torch.cuda.max_memory_reserved() / G:.2f} GiB")
print(f"done in {time.time() - start:.0f} s")
EOF
work=$(mktemp -d)
"$PY" benchmark/rehearse.py --profile 80g --work_dir "$work" | tail -n 1
timeout 900 "$PY" benchmark/rehearse.py --profile 80g --work_dir "$work" --on_gpu | tail -n 1
"$PY" benchmark/rehearse.py --service --work_dir "$work" | tail -n 1
timeout 300 "$PY" benchmark/rehearse.py --service --work_dir "$work" --on_gpu | tail -n 1
rm -rf "$work"
