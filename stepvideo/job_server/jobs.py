"""``JobStore``: the generation server's jobs in SQLite (WAL) and their videos beside it.

Layout of ``--state_dir``::

    jobs.sqlite3 (+ -wal, -shm)   one row per job
    videos/<id>.mp4               the video of each completed job (written atomically)
    orphans/                      video files found at start-up without a job record
    server.lock                   held by the running server: one server per state dir

Before anything else, :mod:`.state_dir` checks that the state dir and ``videos/`` are
writable and that the database is readable and not empty while there are videos: a damaged
database stops the start with a line naming the file, it never leads to deleting videos.

Invariants (kept by :meth:`JobStore.reconcile` at every start, after any crash):

- a ``completed`` job has its file, and every file belongs to a ``completed`` job (a video file
  without a record is moved to ``orphans/``, never deleted: after a database restored from a
  backup it is the only copy);
- ``videos/<id>.latents.safetensors`` (the denoised latents a failed decode leaves) exists
  only for a ``failed`` job; it goes when the job is deleted;
- a row whose stored JSON cannot be read is listed with empty settings (``damaged`` set) and,
  if it is queued, failed by the worker: one bad row never stops the server;
- progress never goes down, also across a re-queue (the re-run catches up with it);
- no ``in_progress`` job survives a restart: a job that was running when the server died is
  **re-queued** (the work restarts from the beginning; with a seed the video is the same). If
  its video had already been renamed into place it is marked ``completed`` instead. A job
  that was running at :data:`MAX_ATTEMPTS` starts is marked ``failed`` with "server
  restarted", so a job that crashes the server cannot crash it forever.

All methods are thread-safe (one connection, one lock): HTTP threads and the worker share it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..vae.latents_file import SUFFIX as LATENTS_SUFFIX
from . import state_dir as state_checks

logger = logging.getLogger(__name__)

QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "queued", "in_progress", "completed", "failed", "cancelled"
STATUSES = (QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)
FINISHED = (COMPLETED, FAILED, CANCELLED)
MAX_ATTEMPTS = 2
RESTARTED = "server restarted"
ORPHANS = "orphans"          # video files found without a job record are moved here, never deleted

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    prompt TEXT NOT NULL,
    settings TEXT NOT NULL,
    image BLOB,
    progress REAL NOT NULL DEFAULT 0,
    stage TEXT,
    timings TEXT,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    size_bytes INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""
_COLUMNS = ("seq", "id", "status", "created_at", "started_at", "completed_at", "prompt", "settings", "progress",
            "stage", "timings", "error", "cancel_requested", "attempts", "size_bytes")


class QueueFull(Exception):
    """``max_queue`` jobs are already waiting."""

    def __init__(self, queued: int):
        super().__init__(f"the queue is full ({queued} jobs waiting); retry later")
        self.queued = queued


class StateDirBusy(RuntimeError):
    """Another server holds this state dir."""


@dataclass(frozen=True)
class Job:
    """One row, as the API shows it (the image bytes are not part of it)."""

    seq: int
    id: str
    status: str
    created_at: float
    started_at: Optional[float]
    completed_at: Optional[float]
    prompt: str
    settings: Dict[str, Any]
    progress: float
    stage: Optional[str]
    timings: Dict[str, Any]
    error: Optional[str]
    cancel_requested: bool
    attempts: int
    size_bytes: Optional[int]
    damaged: Optional[str] = None      # why the row's stored JSON could not be read (server side only)

    def to_api(self) -> Dict[str, Any]:
        out = {"id": self.id, "object": "video", "status": self.status, "created_at": int(self.created_at),
               "started_at": _int_or_none(self.started_at), "completed_at": _int_or_none(self.completed_at),
               "progress": round(self.progress, 4), "stage": self.stage, "prompt": self.prompt,
               "settings": self.settings, "timings": self.timings, "error": self.error,
               "cancel_requested": self.cancel_requested, "attempts": self.attempts}
        if self.status == COMPLETED:
            out["content_url"] = f"/v1/videos/{self.id}/content"
            out["size_bytes"] = self.size_bytes
        return out


def _int_or_none(value: Optional[float]) -> Optional[int]:
    return None if value is None else int(value)


def new_job_id() -> str:
    return "video_" + secrets.token_hex(12)


class JobStore:
    """Jobs of one server; :meth:`open` takes the state dir's lock and reconciles it."""

    def __init__(self, state_dir: os.PathLike, conn: sqlite3.Connection, lock_fd: int):
        self.state_dir = Path(state_dir)
        self.videos_dir = self.state_dir / "videos"
        self._conn = conn
        self._lock = threading.RLock()
        self._lock_fd = lock_fd

    @classmethod
    def open(cls, state_dir: os.PathLike) -> "JobStore":
        import fcntl

        root = Path(state_dir)
        state_checks.prepare(root)
        fd = os.open(root / "server.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StateDirBusy(f"--state_dir {root} is used by another running server (its server.lock is held); "
                               "give each server its own state dir") from None
        try:
            state_checks.check_database_file(root)
            conn = sqlite3.connect(str(root / state_checks.DB_NAME), check_same_thread=False, isolation_level=None,
                                   timeout=30.0)
            state_checks.check_database(conn, root)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")     # WAL + NORMAL: durable across process crashes
            conn.executescript(_SCHEMA)
        except sqlite3.Error as err:
            os.close(fd)
            raise state_checks.open_error(root, err) from None
        except state_checks.StateDirError:
            os.close(fd)
            raise
        store = cls(root, conn, fd)
        store.reconcile()
        return store

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    def video_path(self, job_id: str) -> Path:
        return self.videos_dir / f"{job_id}.mp4"

    def latents_path(self, job_id: str) -> Path:
        """Where a failed decode leaves the job's denoised latents."""
        return self.videos_dir / f"{job_id}{LATENTS_SUFFIX}"

    # ------------------------------------------------------------------------------------
    def reconcile(self) -> Dict[str, int]:
        """Make records and files agree after a crash (see the module docstring); returns counts."""
        counts = {"requeued": 0, "recovered": 0, "failed": 0, "orphans": 0, "partials": 0, "missing": 0,
                  "latents": 0}
        with self._lock:
            for path in self.videos_dir.iterdir():
                if path.name.startswith(".") and "partial" in path.name:     # an interrupted atomic write
                    path.unlink()
                    counts["partials"] += 1
            now = time.time()
            for job in self._select("status = ?", (IN_PROGRESS,)):
                path = self.video_path(job.id)
                if path.is_file() and not job.cancel_requested:
                    self._update(job.id, status=COMPLETED, progress=1.0, stage=None, completed_at=now,
                                 size_bytes=path.stat().st_size)
                    counts["recovered"] += 1
                elif job.cancel_requested:
                    self._update(job.id, status=CANCELLED, stage=None, completed_at=now)
                elif job.attempts >= MAX_ATTEMPTS:
                    self._update(job.id, status=FAILED, stage=None, completed_at=now,
                                 error=f"{RESTARTED} during this job {job.attempts} times; not retried")
                    counts["failed"] += 1
                else:
                    # progress is kept: it never goes down, the re-run catches up with it
                    self._update(job.id, status=QUEUED, stage=None, started_at=None, timings=json.dumps({}))
                    counts["requeued"] += 1
            completed = {job.id for job in self._select("status = ?", (COMPLETED,))}
            for job_id in sorted(completed):
                if not self.video_path(job_id).is_file():
                    self._update(job_id, status=FAILED, error="the video file was missing at start-up")
                    counts["missing"] += 1
            for path in self.videos_dir.glob("*.mp4"):
                if path.stem not in completed:      # kept aside, never deleted: it may be the only copy
                    orphans = self.state_dir / ORPHANS
                    orphans.mkdir(exist_ok=True)
                    path.replace(orphans / path.name)
                    counts["orphans"] += 1
            failed = {job.id for job in self._select("status = ?", (FAILED,))}
            for path in self.videos_dir.glob(f"*{LATENTS_SUFFIX}"):
                if path.name[:-len(LATENTS_SUFFIX)] not in failed:
                    path.unlink()
                    counts["latents"] += 1
            for job in self._select("1", ()):
                if job.damaged:
                    logger.warning("job %s (%s): %s; it is listed with empty settings%s", job.id, job.status,
                                   job.damaged, ", and fails when it runs" if job.status == QUEUED else "")
        if any(counts.values()):
            logger.info("state dir %s reconciled: %s", self.state_dir, counts)
        if counts["orphans"]:
            logger.warning("%d video file(s) in %s had no job record; moved to %s (delete them once you know they "
                           "are not needed)", counts["orphans"], self.videos_dir, self.state_dir / ORPHANS)
        return counts

    # ------------------------------------------------------------------------------------
    def add(self, prompt: str, settings: Dict[str, Any], image: Optional[bytes], max_queue: int) -> Job:
        """Queue a job; :class:`QueueFull` when ``max_queue`` jobs are already waiting."""
        with self._lock:
            queued = self.count(QUEUED)
            if queued >= max_queue:
                raise QueueFull(queued)
            job_id = new_job_id()
            self._conn.execute("INSERT INTO jobs (id, status, created_at, prompt, settings, image, timings) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (job_id, QUEUED, time.time(), prompt, json.dumps(settings, allow_nan=False), image,
                                json.dumps({})))
            return self.get(job_id)

    def get(self, job_id: str) -> Optional[Job]:
        with self._lock:
            rows = self._select("id = ?", (job_id,))
        return rows[0] if rows else None

    def image(self, job_id: str) -> Optional[bytes]:
        with self._lock:
            row = self._conn.execute("SELECT image FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    def list(self, limit: int, after: Optional[str] = None, newest_first: bool = True) -> Tuple[List[Job], bool]:
        """Newest (or oldest) first; ``after``: a job id, return the jobs that come after it in that
        order. Returns (jobs, has_more)."""
        with self._lock:
            where, params = "1", ()
            if after is not None:
                anchor = self._conn.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
                if anchor is None:
                    raise KeyError(after)
                where, params = ("seq < ?" if newest_first else "seq > ?"), (anchor[0],)
            rows = self._select(where, params, order="seq DESC" if newest_first else "seq", limit=limit + 1)
        return rows[:limit], len(rows) > limit

    def count(self, status: str) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).fetchone()[0]

    def counts(self) -> Dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        out = {status: 0 for status in STATUSES}
        out.update(dict(rows))
        return out

    def queue_position(self, job: Job) -> Optional[int]:
        """0 = next to run."""
        if job.status != QUEUED:
            return None
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM jobs WHERE status = ? AND seq < ?",
                                      (QUEUED, job.seq)).fetchone()[0]

    # -- worker side ----------------------------------------------------------------------
    def claim_next(self) -> Optional[Job]:
        """The oldest queued job, now ``in_progress``; ``None`` when the queue is empty."""
        with self._lock:
            rows = self._select("status = ?", (QUEUED,), order="seq", limit=1)
            if not rows:
                return None
            job = rows[0]
            self._update(job.id, status=IN_PROGRESS, started_at=time.time(), attempts=job.attempts + 1,
                         stage="encoding")
            return self.get(job.id)

    def set_progress(self, job_id: str, progress: float, stage: str, timings: Optional[dict] = None) -> None:
        """Progress never goes down (``MAX`` in SQL), whatever order updates arrive in."""
        with self._lock:
            self._conn.execute("UPDATE jobs SET progress = MAX(progress, ?), stage = ?, timings = COALESCE(?, timings) "
                               "WHERE id = ? AND status = ?",
                               (progress, stage, None if timings is None else json.dumps(timings), job_id,
                                IN_PROGRESS))

    def finish(self, job_id: str, status: str, timings: Optional[dict] = None, error: Optional[str] = None) -> None:
        """End a running job. A ``completed`` job's video must already be in place; a job whose
        cancel was requested while it finished is ``cancelled`` and its video removed."""
        with self._lock:
            job = self.get(job_id)
            if job is None:
                return
            fields: Dict[str, Any] = {"stage": None, "completed_at": time.time(), "error": error}
            if timings is not None:
                fields["timings"] = json.dumps(timings)
            if status == COMPLETED and job.cancel_requested:
                status = CANCELLED
            if status == COMPLETED:
                fields.update(progress=1.0, size_bytes=self.video_path(job_id).stat().st_size)
            self._update(job_id, status=status, **fields)
        if status != COMPLETED:
            self._remove_file(job_id)

    def requeue(self, job_id: str) -> None:
        """A running job interrupted by a shutdown goes back to the queue (its attempt is not counted)."""
        with self._lock:
            job = self.get(job_id)
            if job is not None and job.status == IN_PROGRESS:
                self._update(job_id, status=QUEUED, stage=None, started_at=None, attempts=max(0, job.attempts - 1))
        self._remove_file(job_id)

    def cancel(self, job_id: str) -> Optional[Job]:
        """Queued -> ``cancelled`` now; in progress -> ``cancel_requested`` (the worker stops at the
        next step). Returns the job after the change, ``None`` if unknown."""
        with self._lock:
            job = self.get(job_id)
            if job is None:
                return None
            if job.status == QUEUED:
                self._update(job_id, status=CANCELLED, completed_at=time.time(), image=None)
            elif job.status == IN_PROGRESS:
                self._update(job_id, cancel_requested=1)
            return self.get(job_id)

    def delete(self, job_id: str) -> bool:
        """Remove a finished job's record, then its file (a crash in between leaves an orphan file
        that the next start removes, never a record without its file)."""
        with self._lock:
            cur = self._conn.execute("DELETE FROM jobs WHERE id = ? AND status IN (?, ?, ?)", (job_id, *FINISHED))
            deleted = cur.rowcount > 0
        if deleted:
            self._remove_file(job_id)
            self._remove_latents(job_id)
        return deleted

    def _remove_file(self, job_id: str) -> None:
        try:
            self.video_path(job_id).unlink()
        except FileNotFoundError:
            pass

    def _remove_latents(self, job_id: str) -> None:
        try:
            self.latents_path(job_id).unlink()
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------------------------
    def _select(self, where: str, params: tuple, order: str = "seq", limit: Optional[int] = None) -> List[Job]:
        sql = f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE {where} ORDER BY {order}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_row_to_job(row) for row in self._conn.execute(sql, params).fetchall()]

    def _update(self, job_id: str, **fields) -> None:
        sets = ", ".join(f"{name} = ?" for name in fields)
        self._conn.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id))


_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_text(value: Any) -> Any:
    """A lone surrogate (JSON escapes can store one; UTF-8 cannot carry it) -> U+FFFD, so the row
    can be answered; any other value as it is."""
    return _SURROGATE.sub("\ufffd", value) if isinstance(value, str) else value


def _row_to_job(row) -> Job:
    """A row -> :class:`Job`. Stored JSON that does not read back as an object (a hand edit, a
    database from another version) gives ``{}`` and ``damaged`` says why, logged under the id."""
    data = dict(zip(_COLUMNS, row))
    problems = []
    for name in ("settings", "timings"):
        try:
            value = json.loads(data[name] or "{}")
        except (TypeError, ValueError, RecursionError) as err:
            value = err
        if not isinstance(value, dict):
            problems.append(f"stored {name} unreadable ({type(value).__name__})")
            value = {}
        data[name] = {key: _valid_text(item) for key, item in value.items()}
    data["cancel_requested"] = bool(data["cancel_requested"])
    if problems:
        data["damaged"] = "; ".join(problems)
    return Job(**data)
