"""Performance tools for the DiT: FLOP and memory models, FP8 linears, block offload, compile.

Submodules are imported on use (``from stepvideo.perf import offload``); importing the package
imports nothing heavy.
"""
