"""A ready-made example run, built once per server in the background at start, so that a first visitor
sees heatmaps within seconds while (or before) they train their own.

The example trains the memory banks, which need no training loop (AnomalyDINO first: the fastest), and
their ensemble on the demo's brick category with the quick preset and the default protocol (fit, calibrate,
refit). It is saved twice: right after fitting (heatmaps can show) and again with its evaluation
(curves and metrics). Example runs live in ``<workspace root>/examples/``: shared by every session, read
only, holding no user data (annotations and verdicts on them stay per user). ``UADLAB_EXAMPLE=0`` turns
them off.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

from .. import settings
from ..progress import Progress
from ..safety import workspace_root

METHODS = ("anomalydino", "patchcore", "ensemble")
CATEGORY = "brick"
log = logging.getLogger("uadlab.examples")


def examples_dir(root: str | Path | None = None) -> Path:
    return (Path(root) if root is not None else workspace_root()) / "examples"


def enabled() -> bool:
    return settings.examples_enabled()


def _key() -> str:
    from .sources import demo_kwargs

    spec = {"methods": METHODS, "category": CATEGORY, "demo": demo_kwargs(), "version": 1}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


class ExampleBuilder:
    """Builds the example run in a daemon thread; ``state`` says how far it is (shown by the app)."""

    def __init__(self) -> None:
        self.state = "not started"
        self.done = threading.Event()

    def start(self) -> "ExampleBuilder":
        if not enabled():
            self.state = "off"
            self.done.set()
            return self
        threading.Thread(target=self._build, name="uadlab-example", daemon=True).start()
        return self

    def _build(self) -> None:
        from ..data import load_mvtec
        from ..demo import make_demo
        from ..pipeline import Run, RunConfig
        from .sources import DataChoice, dataset_key, demo_kwargs

        folder = examples_dir() / f"example-{_key()}"
        try:
            if (folder / "run.json").exists() and json.loads((folder / "run.json").read_text()).get("evaluation"):
                self.state = "ready"
                return
            lock = examples_dir() / f".{folder.name}.lock"
            lock.parent.mkdir(parents=True, exist_ok=True)
            try:  # one builder per workspace root, even with several app processes
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.close(fd)
            except FileExistsError:
                if time.time() - lock.stat().st_mtime < 3600:
                    self.state = "built by another process"
                    return
                lock.touch()
            try:
                t0 = time.perf_counter()
                self.state = "making the demo images"
                ds = load_mvtec(make_demo(**demo_kwargs()), categories=[CATEGORY], skip_bad=True)
                run = Run(RunConfig.resolve(list(METHODS), "quick"), workdir=examples_dir())
                run.run_id, run.dir = folder.name, folder
                run.fit(ds.train, progress=self._report)
                data = DataChoice("demo", category=CATEGORY)
                extra = {"data": data.to_dict(), "dataset_key": dataset_key(data), "dataset": ds.summary(), "example": True}
                run.save(extra)  # heatmaps can show from here on
                self.state = "scoring the test images"
                evaluation = run.evaluate(ds.test, progress=self._report)
                run.save({"evaluation": evaluation})
                self.state = "ready"
                log.info("example run built in %.1f s", time.perf_counter() - t0)
            finally:
                lock.unlink(missing_ok=True)
        except Exception as e:  # noqa: BLE001 - the app works without its example
            self.state = f"failed ({type(e).__name__})"
            log.exception("building the example run failed")
        finally:
            self.done.set()

    def _report(self, p: Progress) -> None:
        self.state = p.text


BUILDER = ExampleBuilder()


def saved_example() -> str | None:
    """The run id of the example run once saved (heatmaps can show), else None."""
    folder = examples_dir() / f"example-{_key()}"
    return folder.name if (folder / "run.json").exists() else None


def building() -> bool:
    return BUILDER.state not in ("not started", "off") and not BUILDER.done.is_set()


def start() -> ExampleBuilder:
    """Start building the example run (once per process)."""
    if BUILDER.state == "not started":
        BUILDER.start()
    return BUILDER
