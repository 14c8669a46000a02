"""This process as rank ``rank`` of an ``nproc``-rank layout, with torch's ``fake`` process group.

The ``fake`` backend (with its ``FakeStore``) accepts every collective and moves no data, which is
what tensor collectives on shape-only tensors need. Object collectives carry values, so they are
answered here: ``all_gather_object`` gives every rank this rank's object (no other rank failed),
and ``broadcast_object_list`` from rank 0 is recorded on rank 0 (tensors as shape and dtype) and
replayed, in the same order, on the other ranks: a rank-R rehearsal needs the recording of the
rank-0 rehearsal of the same layout (:func:`rehearse` runs it first when it is missing).
"""
from __future__ import annotations

import contextlib
import dataclasses
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
from torch.utils._pytree import tree_map


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple
    dtype: torch.dtype
    device: str


def _map_leaves(fn, value):
    """``tree_map`` that also walks dataclass instances (e.g. the pipeline's ``EncodedInputs``)."""
    def leaf(x):
        if dataclasses.is_dataclass(x) and not isinstance(x, (type, TensorSpec)):
            return dataclasses.replace(x, **{f.name: _map_leaves(fn, getattr(x, f.name))
                                             for f in dataclasses.fields(x) if f.init})
        return fn(x)
    return tree_map(leaf, value)


def _to_spec(value):
    return _map_leaves(lambda t: TensorSpec(tuple(t.shape), t.dtype, str(t.device))
                       if isinstance(t, torch.Tensor) else t, value)


def _from_spec(value):
    return _map_leaves(lambda s: torch.empty(s.shape, dtype=s.dtype, device=s.device)
                       if isinstance(s, TensorSpec) else s, value)


@contextlib.contextmanager
def fake_process_group(rank: int, nproc: int, recording: Optional[Path]):
    """Initialise the fake group and answer object collectives (see the module docstring);
    ``recording``: the file rank 0 writes and the other ranks read."""
    if nproc == 1:
        yield
        return
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    recorded: List = []
    replay: List = []
    if rank != 0:
        if recording is None or not recording.is_file():
            raise FileNotFoundError(f"rank {rank} replays rank 0's broadcasts: rehearse rank 0 of this layout "
                                    f"first ({recording} is missing)")
        replay = pickle.loads(recording.read_bytes())
    originals = dist.all_gather_object, dist.broadcast_object_list

    def all_gather_object(object_list, obj, group=None):
        object_list[:] = [obj] * len(object_list)

    def broadcast_object_list(object_list, src=0, group=None, device=None, group_src=None):
        if rank == src:
            recorded.append(_to_spec(list(object_list)))
        else:
            object_list[:] = _from_spec(replay.pop(0))

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=nproc)
    dist.all_gather_object, dist.broadcast_object_list = all_gather_object, broadcast_object_list
    try:
        yield
    finally:
        dist.all_gather_object, dist.broadcast_object_list = originals
        if dist.is_initialized():
            dist.destroy_process_group()
        if rank == 0 and recording is not None:
            recording.write_bytes(pickle.dumps(recorded))
