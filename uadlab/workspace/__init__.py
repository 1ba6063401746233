"""Per-user workspaces behind the app: a folder, its data sources, runs and annotations.

Layout on disk (root from ``UADLAB_WORKSPACE``, default ``./workspace``; never served to the web)::

    <root>/uadlab.sqlite              annotations and reviews of every user (see store.py)
    <root>/users/<user>/data.json     the current data source (never a token)
    <root>/users/<user>/prefs.json    small preferences (the image being annotated)
    <root>/users/<user>/uploads/<id>/ unpacked uploads
    <root>/users/<user>/runs/<run>/   saved runs (pipeline.Run.save)

A user is a random hex id kept in the browser (``session``), so a reload finds the same workspace while
other browsers do not see it. ``Workspace(user)`` is cheap: it holds paths, never models; loaded runs
and datasets live in process-wide LRUs keyed by user. Every use touches the folder; the sweep deletes
workspaces untouched for ``UADLAB_EXPIRE_DAYS`` (their annotations too). Limits: see safety.py; disk is
bounded per workspace AND for all of them together (``UADLAB_MAX_DISK_BYTES``, and the disk's free space),
so that new sessions cannot each bring a fresh quota.

    ws.data         sources.DataSources      current data, uploads, auxiliary sets
    ws.runs         runs.Runs                train, load, score, evaluate, explain
    ws.annotations  annotations.Annotations  annotate, review, export
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from ..fsio import write_atomic
from ..safety import QuotaError, disk_usage, limits, megabytes, workspace_root
from . import examples
from .annotations import Annotations
from .runs import Runs
from .session import JOBS, browser_secret, expire_workspaces, new_user_id, start_sweeper, sweep, valid_user_id
from .sources import DataSources, dataset_key, default_selection, describe, source_label, thumbnail
from .store import AnnotationStore

__all__ = ["JOBS", "Workspace", "browser_secret", "dataset_key", "default_selection", "describe", "examples",
           "expire_workspaces", "new_user_id", "source_label", "start_sweeper", "sweep", "thumbnail", "valid_user_id",
           "workspace_root"]


class Workspace:
    """Everything one user owns: a folder with data, uploads, runs; rows of the annotation store.

    Args:
        user: the user's random hex id (validated: it becomes a folder name).
        root: the workspace root (default: ``workspace_root()``).
    """

    def __init__(self, user: str, root: str | Path | None = None) -> None:
        if not valid_user_id(user):
            raise ValueError("invalid workspace id (expected 8 to 64 hex characters)")
        self.user = user
        self.root = Path(root) if root is not None else workspace_root()
        self.dir = self.root / "users" / user
        self.dir.mkdir(parents=True, exist_ok=True)
        os.utime(self.dir)  # "last used": the expiry sweep keeps workspaces touched within UADLAB_EXPIRE_DAYS
        self.store = AnnotationStore(self.root / "uadlab.sqlite")
        self.data = DataSources(self)
        self.runs = Runs(self)
        self.annotations = Annotations(self)

    # ---- preferences ------------------------------------------------------------------------------------------
    def prefs(self) -> dict[str, Any]:
        p = self.dir / "prefs.json"
        try:
            return json.loads(p.read_text()) if p.exists() else {}
        except (OSError, json.JSONDecodeError):
            return {}

    def set_pref(self, key: str, value: Any) -> None:
        prefs = {**self.prefs(), key: value}
        write_atomic(self.dir / "prefs.json", json.dumps(prefs))  # two tabs may write at once

    # ---- quotas -------------------------------------------------------------------------------------------------
    def check_upload(self, size: int, images: int, unpacked: int | None = None, voxels: int = 0) -> int:
        """Refuse an upload past the limits (QuotaError saying which); return the workspace's free bytes.

        Args:
            voxels: pixels x slices the upload's DICOM and NIfTI files declare (``medical.declared_voxels``).
        """
        lim = limits()
        if size > lim.upload_bytes:
            raise QuotaError(f"the upload is {megabytes(size)}; the limit per upload is {megabytes(lim.upload_bytes)}")
        if images > lim.upload_images:
            raise QuotaError(f"the upload holds {images} images; the limit per upload is {lim.upload_images}")
        if voxels > lim.upload_voxels:
            raise QuotaError(f"the scans of the upload hold {voxels / 1e6:,.0f} million voxels; the limit per upload "
                             f"is {lim.upload_voxels / 1e6:,.0f} million (fewer or smaller volumes)")
        return self.check_disk(size if unpacked is None else unpacked)

    def check_disk(self, extra: int = 0) -> int:
        """Refuse to add ``extra`` bytes past the workspace's disk limit or the server's (every workspace
        together, and the free space of the disk); return the bytes this workspace may still add."""
        lim = limits()
        used = disk_usage(self.dir)
        if used + extra > lim.workspace_bytes:
            expiry = f"; workspaces unused for {lim.expire_days:g} days are deleted" if lim.expire_days else ""
            raise QuotaError(f"this workspace is full: it holds {megabytes(used)} of {megabytes(lim.workspace_bytes)}"
                             f"{f' and this needs {megabytes(extra)} more' if extra else ''}{expiry}")
        total = total_usage(self.root)
        free = shutil.disk_usage(self.root).free - DISK_RESERVE
        if total + extra > lim.disk_bytes or extra > free:
            raise QuotaError("the server's disk space for workspaces is used up"
                             f"{f' (this needs {megabytes(extra)})' if extra else ''}: try again later, or delete "
                             "runs and uploads you no longer need")
        return max(0, min(lim.workspace_bytes - used, lim.disk_bytes - total, free))


DISK_RESERVE = 1 * 2**30  # bytes of the disk left free whatever the limits say (SQLite, logs, the OS)
_TOTAL: dict[Path, tuple[float, int]] = {}
_TOTAL_LOCK = threading.Lock()


def total_usage(root: Path, max_age: float = 5.0) -> int:
    """Bytes under the workspace root (every workspace, the examples, the annotation database): walked at most
    every ``max_age`` seconds (a walk of thousands of files per request would be the slow part)."""
    now = time.monotonic()
    with _TOTAL_LOCK:
        hit = _TOTAL.get(root)
        if hit is not None and now - hit[0] < max_age:
            return hit[1]
    n = disk_usage(root)
    with _TOTAL_LOCK:
        _TOTAL[root] = (now, n)
    return n
