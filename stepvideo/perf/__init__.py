"""Performance tools for the DiT: FLOP and memory models, FP8 linears, block offload, compile.

Submodules are imported on use (``from stepvideo.perf import fp8``); importing the package
imports nothing heavy.
"""
