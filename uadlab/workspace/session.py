"""Sessions: the random workspace id a browser keeps, the key that protects it, the process-wide caches
keyed by it, and the expiry of workspaces nobody used for ``UADLAB_EXPIRE_DAYS``."""
from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from .. import settings
from ..safety import TRAININGS, limits, remove_stale_exports, workspace_root
from ..store import AnnotationStore

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


class LRU:
    """A small thread-safe least-recently-used cache shared by all sessions of the process.

    Keys start with the user id, so an expired workspace leaves nothing behind (``forget``).
    """

    instances: list["LRU"] = []

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        LRU.instances.append(self)

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        value = make()  # outside the lock: loading a run must not block other users
        self.put(key, value)
        return value

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def drop(self, match: Callable[[Any], bool]) -> None:
        with self._lock:
            for k in [k for k in self._d if match(k)]:
                del self._d[k]

    @classmethod
    def forget(cls, users: set[str]) -> None:
        for lru in cls.instances:
            lru.drop(lambda k: k[0] in users)


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
