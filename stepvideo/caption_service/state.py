"""``ServiceState``: what one app instance holds between requests.

The (possibly still loading) components, the per-device gates, the admission counter, the
memory budget and the cost model. Built by :func:`stepvideo.caption_service.server.create_app`; the
handlers receive it with each call.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Dict, Optional, Union

from .admission import Admission
from .components import ServiceComponents
from .config import ServiceConfig
from .cost import VAECostModel, cost_model_for, default_budget
from .gate import DeviceGate

logger = logging.getLogger(__name__)

ComponentsArg = Union[ServiceComponents, "Future[ServiceComponents]"]


class NotReady(Exception):
    """Models still loading (503) or failed to load (500)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class ServiceState:
    """Per-app state. ``components`` is a :class:`ServiceComponents` or a Future of one."""

    def __init__(self, components: ComponentsArg, config: ServiceConfig):
        self.config = config
        self.started = time.time()
        if isinstance(components, ServiceComponents):
            done: Future = Future()
            done.set_result(components)
            components = done
        self._future = components
        self._gates: Dict[str, DeviceGate] = {}
        self._gates_lock = threading.Lock()
        self.admission = Admission(config.threads, self.retry_after)
        self.budget_bytes: Optional[int] = config.max_memory_bytes
        self.budget_source = "--max_memory_gb" if config.max_memory_bytes is not None else "not known before loading"
        self.vae_cost: Optional[VAECostModel] = None
        self._future.add_done_callback(self._loaded)

    # -- loading --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._future.done() and self._future.exception() is None

    def components(self) -> ServiceComponents:
        if not self._future.done():
            raise NotReady("models are still loading; poll GET /ready", 503)
        err = self._future.exception()
        if err is not None:
            raise NotReady(f"models failed to load: {type(err).__name__}: {err}", 500)
        return self._future.result()

    def _loaded(self, future: Future) -> None:
        """Once the models are in: the default budget (measured now) and the VAE cost model,
        warmed up in the background so the first request does not pay for it."""
        if future.exception() is not None:
            return
        comps: ServiceComponents = future.result()
        if self.budget_bytes is None:
            devices = ([comps.vae_device] if comps.vae is not None else []) + \
                      ([comps.caption_device] if comps.caption is not None else [])
            self.budget_bytes, self.budget_source = default_budget(devices or ["cpu"])
        logger.info("memory budget per request: %.2f GiB (%s)", self.budget_bytes / (1 << 30), self.budget_source)
        self.vae_cost = comps.vae_cost
        if self.vae_cost is None:
            self.vae_cost = cost_model_for(comps.vae)
            if self.vae_cost is not None:
                threading.Thread(target=self._warm_up, name="stepvideo-cost-warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        try:
            self.vae_cost.warm_up()
        except Exception:  # noqa: BLE001 - the first request will report the problem
            logger.warning("warming up the VAE cost model failed", exc_info=True)

    # -- devices --------------------------------------------------------------------------

    def gate(self, device: str) -> DeviceGate:
        with self._gates_lock:
            if device not in self._gates:
                self._gates[device] = DeviceGate(device, self.config.queue_size, self.config.queue_timeout)
            return self._gates[device]

    def retry_after(self) -> int:
        """``Retry-After`` for a refused request: the longest estimate among the device gates."""
        with self._gates_lock:
            gates = list(self._gates.values())
        return max([g.retry_after() for g in gates] or [1])
