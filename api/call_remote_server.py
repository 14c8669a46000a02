"""Caption/VAE service launcher: Step-LLM + HunyuanCLIP and the Video-VAE on their own GPU.

    python api/call_remote_server.py --model_dir ckpts/stepvideo-t2v --port 8080

Binds 127.0.0.1 by default (``--host 0.0.0.0`` to expose; then set a token with
STEPVIDEO_SERVICE_TOKEN). Everything lives in :mod:`stepvideo.caption_service`; see docs/service.md.
"""
import sys

from stepvideo.caption_service.cli import main

if __name__ == "__main__":
    sys.exit(main())
