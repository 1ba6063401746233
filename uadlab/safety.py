"""What keeps the app safe to serve in public: limits, allowed folders, Hub ids, tokens, path-free messages.

- Limits (env, read on every call so an operator's change applies at once): upload size and image count
  per upload, disk per workspace, concurrent trainings per workspace and per process, workspace expiry.
- Folders on the server are readable only under the roots listed in ``UADLAB_LOCAL_FOLDERS`` (none by
  default, so a Space never reads them); the app's own data (workspace, feature cache, gradio's upload
  folder) is never readable, served or listed, whatever the roots.
- Tokens (``tokens``: whose token a call sends, scrubbing) never reach a message; messages show no absolute
  server path (``public_text``).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from . import settings
from .errors import DataError
from .tokens import scrub

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
# an absolute path of 2+ parts not inside a URL ("https://h/p": its slashes follow "/" or a word character)
_ABS_PATH = re.compile(r"(?<![\w./~%-])/(?:[^\s/'\"`<>()\[\]{},;]+/)+([^\s/'\"`<>()\[\]{},;]*)")
EXPORT_PREFIX = "uadlab-export-"
SERVED_FILES_TTL = 3600  # seconds a file handed to the browser (heatmap, export) stays in gradio's cache


class QuotaError(ValueError):
    """A per-session or per-server limit was reached; the message says which and what to do."""


@dataclass(frozen=True)
class Limits:
    """Per-session and per-server limits (defaults fit a 2 vCPU / 16 GB / 50 GB-disk Space)."""

    upload_bytes: int = 256 * 2**20  # UADLAB_MAX_UPLOAD_BYTES: one upload (a zip, or loose files together)
    upload_images: int = 2000  # UADLAB_MAX_UPLOAD_IMAGES: images in one upload (and per Hub dataset split)
    workspace_bytes: int = 2 * 2**30  # UADLAB_MAX_WORKSPACE_BYTES: uploads + runs of one workspace
    trainings: int = 1  # UADLAB_MAX_TRAININGS: trainings running at once in the process
    trainings_per_workspace: int = 1  # UADLAB_MAX_TRAININGS_PER_WORKSPACE
    expire_days: float = 7.0  # UADLAB_EXPIRE_DAYS: workspaces untouched this long are deleted (0: never)
    disk_bytes: int = 40 * 2**30  # UADLAB_MAX_DISK_BYTES: every workspace together (new sessions get no fresh disk)
    upload_voxels: int = 2**28  # UADLAB_MAX_UPLOAD_VOXELS: pixels x slices of the scans in one upload (~30 s to read)
    jobs_per_session: int = 1  # UADLAB_MAX_JOBS_PER_SESSION: trainings one session has queued or running

    @classmethod
    def from_env(cls) -> "Limits":
        d = cls()
        n = settings.env_number
        return cls(int(n("UADLAB_MAX_UPLOAD_BYTES", d.upload_bytes)),
                   int(n("UADLAB_MAX_UPLOAD_IMAGES", d.upload_images)),
                   int(n("UADLAB_MAX_WORKSPACE_BYTES", d.workspace_bytes)),
                   max(1, int(n("UADLAB_MAX_TRAININGS", d.trainings))),
                   max(1, int(n("UADLAB_MAX_TRAININGS_PER_WORKSPACE", d.trainings_per_workspace))),
                   n("UADLAB_EXPIRE_DAYS", d.expire_days),
                   int(n("UADLAB_MAX_DISK_BYTES", d.disk_bytes)),
                   int(n("UADLAB_MAX_UPLOAD_VOXELS", d.upload_voxels)),
                   max(1, int(n("UADLAB_MAX_JOBS_PER_SESSION", d.jobs_per_session))))


def limits() -> Limits:
    return Limits.from_env()


def megabytes(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e6:.1f} MB"


def disk_usage(path: str | os.PathLike) -> int:
    """Bytes of the files under ``path`` (links are not followed)."""
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(d, f)).st_size
            except OSError:
                continue
    return total


class Slots:
    """Jobs running at once, per key (a workspace) and in total; past a limit, a clear QuotaError."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: Counter = Counter()

    @contextmanager
    def hold(self, key: str, per_key: int, total: int) -> Iterator[None]:
        with self._lock:
            if self._running[key] >= per_key:
                raise QuotaError(f"a training is already running in this workspace (at most {per_key} at a time): "
                                 "wait for it to finish")
            if sum(self._running.values()) >= total:
                raise QuotaError(f"the server is busy: {total} training(s) are running, the most it runs at once; "
                                 "try again in a few minutes")
            self._running[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._running[key] -= 1
                if self._running[key] <= 0:
                    del self._running[key]

    def busy(self) -> set[str]:
        with self._lock:
            return set(self._running)


TRAININGS = Slots()


# ---- paths ------------------------------------------------------------------------------------------------
workspace_root = settings.workspace_root


def gradio_dirs() -> list[Path]:
    """gradio's folders that its file route serves: uploads and cached copies, and cached examples."""
    try:
        from gradio.utils import get_cache_folder, get_upload_folder
    except ImportError:  # the package without the app
        return [Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()]
    return [Path(get_upload_folder()).resolve(), Path(get_cache_folder()).resolve()]


def protected_paths() -> list[Path]:
    """Folders no user may read as data: the workspace, the feature cache, gradio's folders (others' uploads)."""
    return [workspace_root(), settings.feature_cache_dir().resolve(), *gradio_dirs()]


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def local_roots() -> list[Path]:
    """The server folders users may read (``UADLAB_LOCAL_FOLDERS``, ``os.pathsep``-separated; unset: none).

    Entries that are not folders, or that lie inside the app's own data, are ignored.
    """
    roots = []
    for part in settings.local_folders():
        p = Path(part).expanduser().resolve()
        if p.is_dir() and not any(_inside(p, q) for q in protected_paths()):
            roots.append(p)
    return roots


def resolve_local_folder(text: str) -> Path:
    """A folder a user typed, resolved (links too) and checked to lie inside an allowed root.

    A relative path starts at the first root. Folders holding or inside the app's own data are refused.
    """
    roots = local_roots()
    if not roots:
        raise DataError("reading folders on the server is off here: upload a zip instead (the operator allows "
                        "folders with UADLAB_LOCAL_FOLDERS)")
    text = (text or "").strip()
    if not text:
        raise DataError("enter a folder path")
    p = Path(text).expanduser()
    p = (p if p.is_absolute() else roots[0] / p).resolve()
    root = next((r for r in roots if _inside(p, r)), None)
    if root is None:
        raise DataError(f"{public_text(text)}: outside the folders this server allows "
                        f"({', '.join(r.name for r in roots)})")
    shown = str(Path(root.name) / p.relative_to(root))
    if any(_inside(p, q) or _inside(q, p) for q in protected_paths()):
        raise DataError(f"{shown}: holds the app's own data and cannot be read")
    if not p.is_dir():
        raise DataError(f"{shown}: no such folder")
    return p


def confine(paths: Iterable[str | None], folder: Path) -> bool:
    """True when every given path resolves (links followed) inside ``folder`` and outside the app's data."""
    for s in paths:
        if s is None:
            continue
        p = Path(s).resolve()
        if not _inside(p, folder) or any(_inside(p, q) for q in protected_paths()):
            return False
    return True


def hub_id(text: str | None, what: str = "repository") -> str:
    """A Hugging Face id ``owner/name``; paths (absolute, relative, ``..``) are refused."""
    s = (text or "").strip()
    if not s:
        raise DataError(f"enter a Hugging Face {what} id, e.g. owner/name")
    if not _HUB_ID.fullmatch(s) or ".." in s:
        raise DataError(f"{public_text(s)!r} is not a Hugging Face {what} id (owner/name); paths are not accepted")
    if Path(s).exists():  # datasets / huggingface_hub would read the local file instead of the Hub
        raise DataError(f"{s!r} cannot be used as a Hub id on this server: use another id")
    return s


def head_source(text: str | None) -> str:
    """Where to load a head from: a Hub id, or (when folders are allowed) a folder inside an allowed root."""
    s = (text or "").strip()
    if _HUB_ID.fullmatch(s) and ".." not in s and not Path(s).exists():
        return s
    if not local_roots():
        return hub_id(s, "model")
    return str(resolve_local_folder(s))


def public_text(text: str, root: Path | None = None) -> str:
    """``text`` without absolute server paths: uploads as ``upload/…``, the workspace as ``workspace/…``,
    allowed folders by their name, gradio's temp files by their file name, any other path by its last part."""
    root = root or workspace_root()
    subs = [(re.escape(str(root / "users")) + r"/[0-9a-f]{8,64}/uploads/[^/\s'\"]+", "upload"),
            (re.escape(str(root)), "workspace")]
    subs += [(re.escape(str(r)), r.name) for r in local_roots()]
    subs += [(re.escape(str(g)) + r"/[^/\s'\"]+/", "") for g in gradio_dirs()]
    for pattern, repl in subs:
        text = re.sub(pattern, repl.replace("\\", r"\\"), text)
    return _ABS_PATH.sub(lambda m: m.group(1) or "…", text)


# ---- serving ------------------------------------------------------------------------------------------------
def monitoring_enabled() -> bool:
    """Whether gradio's traffic monitoring (``/monitoring``, its summary) is on: only when the operator sets
    ``UADLAB_MONITORING=1`` (gradio turns it on by default, and its summary is public)."""
    return settings.monitoring_enabled()


def public_message(text: str) -> str:
    """The one filter of every text the app shows: no token (typed or the server's), no absolute server path."""
    return public_text(scrub(text))


_SSE_ERROR = re.compile(rb'^event: error|"success":\s*false|"msg":\s*"(?:unexpected_error|log)"', re.M)


class PublicErrors:
    """ASGI middleware: gradio's own error texts pass the app's filter (``public_message``) too.

    gradio words some errors with server paths (a refused file names the blocked paths or the working
    directory). Error answers (HTTP >= 400) are filtered whole; in event streams, only the events that carry
    an error or a log line, so that the file URLs of results stay intact.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state: dict = {"mode": None, "buf": b""}

        async def filtered(message) -> None:
            if message["type"] == "http.response.start":
                ctype = dict(message.get("headers") or []).get(b"content-type", b"")
                state["mode"] = ("sse" if ctype.startswith(b"text/event-stream")
                                 else "error" if message["status"] >= 400 else None)
                if state["mode"] == "error":  # its length changes: sent with the filtered body
                    state["start"] = message
                    return
                return await send(message)
            if message["type"] != "http.response.body" or state["mode"] is None:
                return await send(message)
            more = message.get("more_body", False)
            state["buf"] += message.get("body", b"")
            if state["mode"] == "error":
                if more:
                    return
                body = public_message(state["buf"].decode("utf-8", "replace")).encode()
                headers = [(k, v) for k, v in state["start"].get("headers") or [] if k.lower() != b"content-length"]
                await send({**state["start"], "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                return await send({"type": "http.response.body", "body": body})
            *events, rest = state["buf"].split(b"\n\n")
            if not more:
                events, rest = [*events, rest], b""
            state["buf"] = rest
            out = b"\n\n".join(public_message(e.decode("utf-8", "replace")).encode() if _SSE_ERROR.search(e) else e
                                for e in events)
            if events and more:
                out += b"\n\n"
            await send({**message, "body": out})

        await self.app(scope, receive, filtered)


def launch_guard() -> dict:
    """gradio ``launch`` arguments that keep the app's data off the web; refuses a layout that would serve it.

    The file route serves only gradio's own folders (uploads, cached copies of what callbacks return) and
    ``allowed_paths`` (none here); ``blocked_paths`` adds the workspace and feature cache as a second guard.
    gradio's own error texts pass ``PublicErrors``; its monitoring is off unless ``UADLAB_MONITORING=1``.
    """
    from starlette.middleware import Middleware

    root = workspace_root()
    tmp = Path(tempfile.gettempdir()).resolve()
    for g in gradio_dirs():
        if _inside(root, g) or _inside(g, root):
            raise RuntimeError(f"the workspace ({root}) and gradio's served folder ({g}) overlap: set "
                               "UADLAB_WORKSPACE or GRADIO_TEMP_DIR so that neither holds the other")
    if _inside(tmp, root):
        raise RuntimeError(f"the workspace ({root}) holds the temp folder ({tmp}) where exports are written: "
                           "choose another UADLAB_WORKSPACE")
    blocked = [str(p) for p in protected_paths() if not any(_inside(g, p) for g in gradio_dirs())]
    return {"blocked_paths": blocked, "max_file_size": limits().upload_bytes,
            "enable_monitoring": monitoring_enabled(), "app_kwargs": {"middleware": [Middleware(PublicErrors)]}}


def export_path(name: str) -> Path:
    """A fresh private temp file path for a file handed to the browser (gradio copies it to its cache)."""
    return Path(tempfile.mkdtemp(prefix=EXPORT_PREFIX)) / name


def remove_stale_exports(max_age: float = SERVED_FILES_TTL, now: float | None = None) -> int:
    """Delete export temp folders older than ``max_age`` seconds; return how many went."""
    cutoff = (now or time.time()) - max_age
    gone = 0
    for d in Path(tempfile.gettempdir()).glob(EXPORT_PREFIX + "*"):
        try:
            if d.is_dir() and d.stat().st_mtime < cutoff:
                shutil.rmtree(d, ignore_errors=True)
                gone += 1
        except OSError:
            continue
    return gone


def discard_uploaded_files(paths: Iterable[str | None]) -> None:
    """Delete files gradio received for a failed upload at once (only inside gradio's upload folder)."""
    upload_dir = gradio_dirs()[0]
    for s in paths:
        if not s:
            continue
        p = Path(s).resolve()
        if p.is_file() and p.is_relative_to(upload_dir):
            p.unlink(missing_ok=True)
            if p.parent != upload_dir and not any(p.parent.iterdir()):
                p.parent.rmdir()
