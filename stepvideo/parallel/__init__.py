"""Multi-rank execution helpers (``torch.distributed``; every path also works at world size 1)."""
