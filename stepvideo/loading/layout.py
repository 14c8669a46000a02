"""Names of the official checkpoint directory layout (``stepfun-ai/stepvideo-t2v`` etc.).

::

    <model_dir>/
      model_index.json                  (diffusers bookkeeping; not needed)
      transformer/config.json           DiT constructor arguments
      transformer/diffusion_pytorch_model-0000k-of-0000n.safetensors (+ .index.json)
      scheduler/scheduler_config.json
      vae/vae_v2.safetensors            Video-VAE v2 (vae.safetensors = v1, unused)
      step_llm/config.json, model-0000k-of-0000n.safetensors (+ index), step1_chat_tokenizer.model
      hunyuan_clip/clip_text_encoder/{config.json, pytorch_model.bin | model.safetensors}
      hunyuan_clip/tokenizer/{vocab.txt, tokenizer_config.json, special_tokens_map.json}
"""

TRANSFORMER_DIR = "transformer"
TRANSFORMER_WEIGHTS = "diffusion_pytorch_model"
TRANSFORMER_CONFIG = "config.json"

SCHEDULER_DIR = "scheduler"
SCHEDULER_CONFIG = "scheduler_config.json"

VAE_DIR = "vae"
VAE_V2_FILE = "vae_v2.safetensors"

LLM_DIR = "step_llm"
LLM_WEIGHTS = "model"
LLM_CONFIG = "config.json"
LLM_TOKENIZER_FILE = "step1_chat_tokenizer.model"

CLIP_DIR = "hunyuan_clip"
CLIP_ENCODER_SUBDIR = "clip_text_encoder"
CLIP_TOKENIZER_SUBDIR = "tokenizer"

MODEL_INDEX = "model_index.json"

# allow_patterns for huggingface_hub.snapshot_download, per consumer of a model dir
DIT_PATTERNS = [f"{TRANSFORMER_DIR}/*", f"{SCHEDULER_DIR}/*", MODEL_INDEX]
SERVICE_PATTERNS = [f"{VAE_DIR}/{VAE_V2_FILE}", f"{LLM_DIR}/*", f"{CLIP_DIR}/*"]
