"""Sessions: the random workspace id a browser keeps, the key that protects it, the process-wide caches
keyed by it, the long jobs each one has queued (``JOBS``), and the expiry of workspaces nobody used for
``UADLAB_EXPIRE_DAYS``."""
from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import lru, settings
from ..safety import TRAININGS, QuotaError, limits, remove_stale_exports, workspace_root
from .store import AnnotationStore

_USER_RE = re.compile(r"^[0-9a-f]{8,64}$")
ID_RE = re.compile(r"^[0-9a-zA-Z_-]{1,64}$")  # upload and run ids (they become folder names)


def new_user_id() -> str:
    return uuid.uuid4().hex


def valid_user_id(user: Any) -> bool:
    return isinstance(user, str) and bool(_USER_RE.match(user))


def browser_secret(root: str | Path | None = None) -> str:
    """The key that encrypts the workspace id kept in the browser, stable across app restarts.

    From ``UADLAB_BROWSER_SECRET`` or a file created once in the workspace root (``.browser_secret``);
    a random key per start (gradio's default) would make every browser lose its workspace on a restart.
    """
    env = settings.browser_secret()
    if env:
        return env
    root = Path(root) if root is not None else workspace_root()
    root.mkdir(parents=True, exist_ok=True)
    path = root / ".browser_secret"
    if not path.exists():
        import secrets

        tmp = root / f".browser_secret.{uuid.uuid4().hex}"
        tmp.write_text(secrets.token_hex(16))
        tmp.chmod(0o600)
        try:
            os.link(tmp, path)  # atomic create: two processes starting together agree on one key
        except FileExistsError:
            pass
        tmp.unlink()
    return path.read_text().strip()


class LRU(lru.LRU):
    """A process-wide cache shared by all sessions whose keys start with the user id, so an expired
    workspace leaves nothing behind (``forget``)."""

    instances: list["LRU"] = []

    def __init__(self, size: int) -> None:
        super().__init__(size)
        LRU.instances.append(self)

    @classmethod
    def forget(cls, users: set[str]) -> None:
        for lru in cls.instances:
            lru.drop(lambda k: k[0] in users)


class Jobs:
    """Long jobs (trainings) a session has queued or running, counted BEFORE they enter the server's queue.

    A job takes a ticket when it is submitted (``reserve``) and gives it back when it ends (``held_by``): past
    the limit, the submission is refused at once with a clear message, so one visitor cannot fill the queue
    that every visitor shares. A ticket whose job never started (its browser went away and gradio dropped the
    queued event) does not count: ``reserve`` asks ``alive(holder)`` about unstarted tickets older than
    ``min_age`` seconds, and drops any unstarted ticket older than ``max_wait`` seconds.
    """

    def __init__(self, max_wait: float = 3600, min_age: float = 10) -> None:
        self.max_wait, self.min_age = max_wait, min_age
        self._lock = threading.Lock()
        self._tickets: list[list] = []  # [key, holder, since, started], oldest first

    def reserve(self, key: str, limit: int, holder: str = "", what: str = "training",
                alive: Callable[[str], bool] | None = None) -> None:
        """Take a ticket for one more job of ``key``, or raise QuotaError when ``limit`` are queued or running.

        Args:
            holder: who submitted (gradio's session hash), for ``alive``.
            alive: whether a holder's submission is still in the server's queue.
        """
        now = time.monotonic()
        with self._lock:
            def stale(t: list) -> bool:
                age = now - t[2]
                return not t[3] and (age > self.max_wait or (age > self.min_age and alive is not None
                                                             and not alive(t[1])))

            self._tickets = [t for t in self._tickets if not stale(t)]
            mine = [t for t in self._tickets if t[0] == key]
            if len(mine) >= limit:
                state = "running" if any(t[3] for t in mine) else "queued"
                raise QuotaError(f"you already have a {what} {state} (at most {limit} per session): wait until it "
                                 "has finished, then start the next one")
            self._tickets.append([key, holder, now, False])

    @contextmanager
    def held_by(self, key: str) -> Iterator[None]:
        """Run one job of ``key`` on its oldest waiting ticket (a new one when it has none: a job started from
        Python) and give the ticket back at the end."""
        with self._lock:
            t = next((t for t in self._tickets if t[0] == key and not t[3]), None)
            if t is None:
                t = [key, "", time.monotonic(), True]
                self._tickets.append(t)
            t[3] = True
        try:
            yield
        finally:
            with self._lock:
                self._tickets = [x for x in self._tickets if x is not t]

    def count(self, key: str) -> int:
        """Tickets of ``key``: jobs queued or running."""
        with self._lock:
            return sum(t[0] == key for t in self._tickets)


JOBS = Jobs()


def expire_workspaces(days: float | None = None, root: str | Path | None = None, now: float | None = None) -> list[str]:
    """Delete the workspaces untouched for ``days`` (default ``UADLAB_EXPIRE_DAYS``; 0: never), files and
    annotations; a workspace that is training is kept. Returns the deleted ids."""
    days = limits().expire_days if days is None else days
    root = Path(root) if root is not None else workspace_root()
    users = root / "users"
    if days <= 0 or not users.is_dir():
        return []
    cutoff = (now or time.time()) - days * 86400
    busy = TRAININGS.busy()
    gone = []
    for d in users.iterdir():
        try:
            old = d.stat().st_mtime < cutoff
        except OSError:
            continue
        if old and valid_user_id(d.name) and d.name not in busy:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d.name)
    if gone:
        store = AnnotationStore(root / "uadlab.sqlite")
        for user in gone:
            store.delete_user(user)
        LRU.forget(set(gone))
    return gone


def sweep() -> None:
    """Delete expired workspaces and export temp files older than an hour (run at start, then hourly)."""
    expire_workspaces()
    remove_stale_exports()


def start_sweeper(every: float = 3600) -> threading.Thread:
    """Run ``sweep`` now and then every ``every`` seconds in a daemon thread."""

    def loop() -> None:
        while True:
            try:
                sweep()
            except Exception:  # noqa: BLE001 - a failed sweep must not stop the next one
                logging.getLogger("uadlab.workspace").exception("workspace sweep failed")
            time.sleep(every)

    t = threading.Thread(target=loop, name="uadlab-sweep", daemon=True)
    t.start()
    return t
