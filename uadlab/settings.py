"""Where uadlab keeps its files and what the operator sets: every ``UADLAB_*`` environment variable is read
here (and only here), together with the limits of a run's settings that every interface shares.

Bottom layer: imports nothing from uadlab. Variables are read on every call, so an operator's change (or a
test's ``monkeypatch.setenv``) applies at once.

=============================== =====================================================================
``UADLAB_CACHE``                root of the caches (features, demo data); default ``~/.cache/uadlab``
``UADLAB_WORKSPACE``            users' uploads, runs and annotations; default ``./workspace``
``UADLAB_LOCAL_FOLDERS``        server folders users may read (``os.pathsep``-separated; unset: none)
``UADLAB_BROWSER_SECRET``       key of the workspace id kept in the browser (else a file in the workspace)
``UADLAB_EXAMPLE``              ``0`` / ``false`` / ``no`` / ``off``: no example run in the app
``UADLAB_DEMO``                 arguments of the app's demo data as JSON (e.g. smaller for tests)
``UADLAB_DEBUG``                set: the CLI shows tracebacks of internal errors
``UADLAB_MONITORING``           ``1`` / ``true`` / ``yes`` / ``on``: gradio's traffic monitoring (off by default)
``UADLAB_MAX_*``, ``UADLAB_EXPIRE_DAYS``  the app's limits (``safety.Limits``), read by ``env_number``
=============================== =====================================================================
"""
from __future__ import annotations

import os
from pathlib import Path

# ---- limits of run settings (the CLI, the app and the Python API check them through RunConfig) ----------
DEFAULT_IMAGE_SIZE = 224  # the network input side (centre crop) unless a preset or the user says otherwise
OFFLINE_DEFAULT = "efficientnet_lite0"  # the backbone unless the user names one: packaged weights, works offline
MIN_SIDE, MAX_SIDE = 32, 4096  # network input / resize side in px: 4096 px is already minutes and GBs per image


def check_side(name: str, value: object) -> int:
    """``value`` as an image side in px; ValueError naming the setting and the value when it is not a whole
    number from ``MIN_SIDE`` to ``MAX_SIDE`` (floats that are whole numbers, such as a UI's 256.0, pass)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} {value!r}: give a whole number of pixels ({MIN_SIDE} to {MAX_SIDE})")
    if not MIN_SIDE <= value <= MAX_SIDE:
        raise ValueError(f"{name} {value} px is out of range: use {MIN_SIDE} to {MAX_SIDE} px")
    return value


# ---- environment ------------------------------------------------------------------------------------------
def env_number(name: str, default: float) -> float:
    """A non-negative number from the environment variable ``name`` (``_`` allowed as a separator)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw.replace("_", ""))
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise ValueError(f"{name}={raw!r} must not be negative")
    return value


def cache_root() -> Path:
    """Root of uadlab's caches (``UADLAB_CACHE``, default ``~/.cache/uadlab``)."""
    return Path(os.environ.get("UADLAB_CACHE") or Path.home() / ".cache" / "uadlab")


def feature_cache_dir() -> Path:
    """The default feature cache (``cache_root()/features``)."""
    return cache_root() / "features"


def demo_dir() -> Path:
    """Where generated demo datasets live (``cache_root()/demo``)."""
    return cache_root() / "demo"


def workspace_root() -> Path:
    """Where users' uploads, runs and the annotation database live (``UADLAB_WORKSPACE``, default ./workspace)."""
    return Path(os.environ.get("UADLAB_WORKSPACE", "workspace")).resolve()


def set_workspace_default(path: str) -> None:
    """The workspace root unless the operator set ``UADLAB_WORKSPACE`` (``uadlab app --workspace``)."""
    os.environ.setdefault("UADLAB_WORKSPACE", path)


def local_folders() -> list[str]:
    """The server folders the operator lets users read, as written (``UADLAB_LOCAL_FOLDERS``; unset: none)."""
    return [p.strip() for p in os.environ.get("UADLAB_LOCAL_FOLDERS", "").split(os.pathsep) if p.strip()]


def browser_secret() -> str | None:
    """``UADLAB_BROWSER_SECRET`` when set."""
    return os.environ.get("UADLAB_BROWSER_SECRET") or None


def examples_enabled() -> bool:
    """Whether the app builds its example run (``UADLAB_EXAMPLE``, default on)."""
    return os.environ.get("UADLAB_EXAMPLE", "1").strip().lower() not in ("0", "false", "no", "off")


def demo_settings() -> str:
    """The raw JSON of ``UADLAB_DEMO`` ("" when unset)."""
    return os.environ.get("UADLAB_DEMO", "")


def debug() -> bool:
    """``UADLAB_DEBUG`` set: internal errors show their traceback."""
    return bool(os.environ.get("UADLAB_DEBUG"))


def monitoring_enabled() -> bool:
    """``UADLAB_MONITORING`` on (gradio's traffic monitoring and its public summary; off unless the operator sets it)."""
    return os.environ.get("UADLAB_MONITORING", "").strip().lower() in ("1", "true", "yes", "on")
