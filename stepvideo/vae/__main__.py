"""``python -m stepvideo.vae``: the VAE tool's entry point (its code is :mod:`stepvideo.cli.vae`)."""
import sys

from ..cli.vae import main

sys.exit(main())
