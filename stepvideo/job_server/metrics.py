"""Prometheus metrics of the generation server (``GET /metrics``, text format).

Each app gets its own registry (several servers in one process, e.g. tests, do not clash):

- ``stepvideo_server_queue_depth``              jobs waiting (gauge, read at scrape time)
- ``stepvideo_server_jobs{status=...}``         jobs in the store by status (gauge, at scrape time)
- ``stepvideo_server_jobs_finished_total{status}`` jobs finished since start (counter)
- ``stepvideo_server_step_seconds``             seconds per denoising step (histogram)
- ``stepvideo_server_stage_seconds{stage}``     seconds per stage: encode, denoise, decode, write (histogram)
- ``stepvideo_server_job_seconds``              seconds per job, start to finish (histogram)
"""
from __future__ import annotations

from typing import Callable, Dict

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from ..timing import SHORT_NAMES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 2400)


class _StoreCollector:
    """Queue depth and jobs by status, read from the job store when scraped."""

    def __init__(self, counts: Callable[[], Dict[str, int]]):
        self._counts = counts

    def collect(self):
        counts = self._counts()
        depth = GaugeMetricFamily("stepvideo_server_queue_depth", "Jobs waiting in the queue")
        depth.add_metric([], counts.get("queued", 0))
        yield depth
        jobs = GaugeMetricFamily("stepvideo_server_jobs", "Jobs in the store by status", labels=["status"])
        for status, n in sorted(counts.items()):
            jobs.add_metric([status], n)
        yield jobs


class ServerMetrics:
    """The server's metrics; :meth:`job_finished` records one job's timings."""

    def __init__(self, counts: Callable[[], Dict[str, int]]):
        self.registry = CollectorRegistry()
        self.registry.register(_StoreCollector(counts))
        self.finished = Counter("stepvideo_server_jobs_finished", "Jobs finished since start", ["status"],
                                registry=self.registry)
        self.step_seconds = Histogram("stepvideo_server_step_seconds", "Seconds per denoising step",
                                      buckets=_STEP_BUCKETS, registry=self.registry)
        self.stage_seconds = Histogram("stepvideo_server_stage_seconds", "Seconds per generation stage", ["stage"],
                                       buckets=_STAGE_BUCKETS, registry=self.registry)
        self.job_seconds = Histogram("stepvideo_server_job_seconds", "Seconds per job (start to finish)",
                                     buckets=_STAGE_BUCKETS, registry=self.registry)

    def job_finished(self, status: str, timings: dict, seconds: float) -> None:
        self.finished.labels(status=status).inc()
        self.job_seconds.observe(seconds)
        for step in timings.get("steps_s", []):
            self.step_seconds.observe(step)
        for stage in SHORT_NAMES.values():
            if f"{stage}_s" in timings:
                self.stage_seconds.labels(stage=stage).observe(timings[f"{stage}_s"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
