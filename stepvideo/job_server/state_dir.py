"""Start-up checks of the generation server's ``--state_dir``, before any job is touched.

Two things must hold before :class:`~.jobs.JobStore` reconciles records and files (which
deletes video files that have no record):

* the state dir and its ``videos/`` are writable folders (:func:`prepare`), checked by writing
  a probe file, so a read-only dir is one clear line at start-up, not "ready" followed by jobs
  that all fail at their last step;
* the job database is readable and holds the job table whenever there are videos
  (:func:`check_database`). An empty (0-byte), truncated, damaged or missing ``jobs.sqlite3``
  next to videos is refused, naming the file and the fix, and nothing is deleted: otherwise
  the reconciliation would take every video for an orphan.

Every refusal is a :class:`StateDirError` (a ``ValueError``: the launcher reports it as one line
on every rank). These messages are for the operator; clients never see them.
"""
from __future__ import annotations

import os
import sqlite3
import tempfile
from pathlib import Path
from typing import List

DB_NAME = "jobs.sqlite3"
VIDEOS = "videos"


class StateDirError(ValueError):
    """The state dir cannot be used as it is; the message names the path and the fix."""


def prepare(root: Path) -> None:
    """Create ``root`` and ``root/videos`` if missing, then check that both are writable folders."""
    for folder in (root, root / VIDEOS):
        if folder.exists() and not folder.is_dir():
            raise StateDirError(f"--state_dir: {folder} is not a folder; move it aside or choose another --state_dir")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StateDirError(f"--state_dir: cannot create {folder} ({err.strerror or err}); choose another "
                                "--state_dir or create the folder with write access for this user") from None
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise StateDirError(f"--state_dir: {folder} is not writable ({err.strerror or err}); give this user "
                                "write access to it or choose another --state_dir") from None


def videos_in(root: Path) -> List[Path]:
    return sorted((root / VIDEOS).glob("*.mp4"))


def check_database_file(root: Path) -> None:
    """Before connecting: a missing or 0-byte database next to videos (or a WAL) is refused."""
    db = root / DB_NAME
    wal = root / (DB_NAME + "-wal")
    videos = videos_in(root)
    size = db.stat().st_size if db.exists() else None
    if size and size > 0:
        return
    leftovers = len(videos) or (wal.exists() and wal.stat().st_size > 0)
    if not leftovers:
        return                      # a new state dir (or an empty one): the server creates the database
    state = "missing" if size is None else "empty (0 bytes)"
    _refuse(db, state, len(videos))


def check_database(conn: sqlite3.Connection, root: Path) -> None:
    """After connecting: the database passes SQLite's quick check, and has its job table when
    there are videos. ``sqlite3.Error`` from a damaged file is turned into a refusal."""
    db = root / DB_NAME
    try:
        verdict = conn.execute("PRAGMA quick_check").fetchone()
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as err:
        _refuse(db, f"unreadable ({err})", len(videos_in(root)))
    if verdict is None or verdict[0] != "ok":
        _refuse(db, f"damaged (SQLite quick_check: {verdict[0] if verdict else 'no answer'})", len(videos_in(root)))
    if "jobs" not in tables and videos_in(root):
        _refuse(db, "without its job table", len(videos_in(root)))


def _refuse(db: Path, state: str, videos: int) -> None:
    keep = f"; {videos} video(s) in {db.parent / VIDEOS} were left untouched" if videos else ""
    raise StateDirError(f"--state_dir: the job database {db} is {state}{keep}. Restore {DB_NAME} (with its -wal "
                        f"file, if any) from a backup, or move the state dir aside to start with no jobs")


def open_error(root: Path, err: sqlite3.Error) -> StateDirError:
    """``sqlite3.connect`` (or the first statement) failed: the refusal naming the file."""
    return StateDirError(f"--state_dir: cannot open the job database {root / DB_NAME} ({err}); check that the "
                         "file and its folder are readable and writable by this user")
