"""The first GPU run, rehearsed on a CPU-only host: fake CUDA devices, fake process groups.

``benchmark/rehearse.py`` runs the real generation entry point (``stepvideo.cli.generate``) under
``FakeTensorMode`` with every ``torch.cuda`` question answered by :mod:`.fake_cuda` (through the
seam :mod:`stepvideo.accelerator`), weights read as shape-only tensors from a shape-only model
folder (:mod:`.model_dir`), and every op watched by :mod:`.audit` (mixed devices, host syncs,
host<->device bytes, peak device memory). :mod:`.run` puts them together.
"""
