"""Every rank learns about every rank's failure: run a step, then agree on its outcome.

    plan = on_main(state, lambda: load_plan(...))      # rank 0 computes, every rank gets it
    model = on_all(state, lambda: load_model(...))     # every rank computes, failures are shared

Both are collective (every rank must call them, in the same order). When any rank raises,
every rank raises the same :class:`RankFailure`, carrying the failing rank's one-line
message, so every rank prints the same line and exits with the same code instead of one rank
printing an error and the others dying on a closed socket. The collectives run under the
process group's timeout (``--dist_timeout``): a rank that never arrives makes the others fail
with a clear :class:`RankFailure` after that time rather than hang.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional

from ..errors import is_service_error, is_user_error, one_line


class RankFailure(RuntimeError):
    """A step failed on ``rank``; raised identically on every rank.

    Attributes: ``rank`` (the lowest failing rank), ``message`` (its one-line description),
    ``user_error`` (exit 2 rather than 1), ``service_error`` (a caption/VAE service failure).
    """

    def __init__(self, message: str, rank: int = 0, user_error: bool = True, service_error: bool = False,
                 world_size: int = 1):
        self.message, self.rank, self.world_size = message, rank, world_size
        self.user_error, self.service_error = user_error, service_error
        where = f"rank {rank}: " if world_size > 1 and rank != 0 else ""
        super().__init__(f"{where}{message}")


def describe(exc: BaseException) -> dict:
    """What the other ranks need to re-raise ``exc`` as a :class:`RankFailure`."""
    if isinstance(exc, RankFailure):
        return {"message": exc.message, "user_error": exc.user_error, "service_error": exc.service_error}
    return {"message": one_line(exc), "user_error": is_user_error(exc), "service_error": is_service_error(exc)}


def _gather(state, item: Optional[dict]) -> List[Optional[dict]]:
    import torch.distributed as dist

    items: List[Optional[dict]] = [None] * state.world_size
    try:
        dist.all_gather_object(items, item)
    except Exception as err:          # a rank vanished or the timeout passed
        message = item["message"] if item else "the other ranks did not answer"
        raise RankFailure(f"{message} (lost contact with the other ranks: {one_line(err)}; "
                          f"see the first error line of the other ranks)", rank=state.rank,
                          world_size=state.world_size) from err
    return items


def _raise_first(state, items: List[Optional[dict]], mine: Optional[BaseException]) -> None:
    for rank, item in enumerate(items):
        if item is not None:
            raise RankFailure(item["message"], rank=rank, user_error=item["user_error"],
                              service_error=item["service_error"], world_size=state.world_size) from mine


def on_all(state, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every rank; if any rank raised, raise the same RankFailure on every rank."""
    error: Optional[BaseException] = None
    value = None
    try:
        value = fn()
    except Exception as exc:            # shared below; the traceback stays chained for --debug
        error = exc
    if not state.distributed:
        if error is not None:
            raise error
        return value
    _raise_first(state, _gather(state, describe(error) if error is not None else None), error)
    return value


def on_main(state, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on global rank 0 only; every rank gets its value or raises its failure.

    The value is broadcast with ``broadcast_object_list`` (pickle, inside the trusted process
    group): CPU tensors, numbers, strings, dicts and small dataclasses.
    """
    if not state.distributed:
        return fn()
    import torch.distributed as dist

    error: Optional[BaseException] = None
    box: List[Any] = [None]
    if state.is_main:
        try:
            box[0] = {"value": fn()}
        except Exception as exc:
            error = exc
            box[0] = {"error": describe(exc)}
    try:
        dist.broadcast_object_list(box, src=0)
    except Exception as err:
        raise RankFailure(f"rank 0 did not answer ({one_line(err)})", rank=state.rank,
                          world_size=state.world_size) from err
    payload = box[0]
    if "error" in payload:
        item = payload["error"]
        raise RankFailure(item["message"], rank=0, user_error=item["user_error"],
                          service_error=item["service_error"], world_size=state.world_size) from error
    return payload["value"]
