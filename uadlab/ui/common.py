"""What every screen of the app shares: error handling, the workspace of a session, progress."""
from __future__ import annotations

import functools
import html
import inspect
import logging
import math
import threading
import time
import traceback
from typing import Any, Callable, Iterator

import gradio as gr

from .. import safety as S, tokens
from ..errors import UadlabError
from ..progress import Progress, ProgressFn, format_seconds
from ..workspace import Workspace, valid_user_id

log = logging.getLogger("uadlab.app")


def ui_errors(fn: Callable) -> Callable:
    """Turn any failure of a callback into a ``gr.Error`` without tokens or server paths (the app goes on).

    The values of the callback's arguments named ``*token*`` are scrubbed from messages and logs.
    """
    names = list(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        given = {**dict(zip(names, args)), **kwargs}
        secrets = tokens.secret_variants(v for k, v in given.items() if "token" in k)
        clean = lambda text: S.public_text(tokens.scrub(str(text), secrets))  # noqa: E731
        try:
            return fn(*args, **kwargs)
        except gr.Error as e:
            raise gr.Error(clean(e.message), print_exception=False) from None
        except (UadlabError, ValueError, KeyError, FileNotFoundError) as e:
            raise gr.Error(clean(str(e).strip("'\"")), print_exception=False) from None
        except Exception as e:  # noqa: BLE001
            log.error("callback %s failed: %s", fn.__name__, clean("".join(traceback.format_exception(e))))
            raise gr.Error(clean(f"{type(e).__name__}: {e}"), print_exception=False) from None

    return wrapper


def error_text(message: str) -> str:
    return f'<div class="ui-error" role="alert"><b>Could not do that:</b> {message}</div>'


def in_panel(fn: Callable, status: int, n_outputs: int) -> Callable:
    """Wire ``fn`` so that its error shows in its own panel: output ``status`` gets the message, the other
    outputs keep what they show (instead of gradio blanking every output with "Error"). Generators too."""

    def shown(e: gr.Error):
        out = [gr.skip()] * n_outputs
        out[status] = error_text(e.message)
        return tuple(out) if n_outputs > 1 else out[0]

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def streamed(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error as e:
                yield shown(e)

        return streamed

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as e:
            return shown(e)

    return wrapper


class LiveStatus:
    """A ProgressFn that keeps the job's last event; ``html()`` is the status line a screen shows while the
    job runs: a bar of the whole job, the stage with its counts and ETA, and the time so far. Between events
    the bar moves on toward the end of the running stage (never past it), so it never sits still while a
    step computes without reporting; the percentage printed is the reported one."""

    def __init__(self, what: str = "working", clock: Callable[[], float] = time.monotonic) -> None:
        self.what, self.last, self.clock = what, None, clock
        self.t0 = self.t_last = clock()

    def __call__(self, p: Progress) -> None:
        self.last, self.t_last = p, self.clock()

    def shown(self) -> float:
        """The bar's fraction now: the reported share, plus part of the way to the stage's end that grows with
        the time since the last event (on the scale of the stage's ETA when known, else of 20 s)."""
        p = self.last
        if p is None:
            return 0.0
        frac = p.overall if p.overall is not None else p.fraction
        if p.stage_end is None or p.stage_end <= frac:
            return frac
        tau = max(p.eta_s, 1.0) if p.eta_s else 20.0
        return frac + 0.9 * (p.stage_end - frac) * (1 - math.exp(-(self.clock() - self.t_last) / tau))

    def html(self) -> str:
        p = self.last
        frac = 0.0 if p is None else p.overall if p.overall is not None else p.fraction
        text = self.what if p is None or not p.text else p.text
        return (f'<div class="uad-progress" role="status" aria-live="polite"><progress max="1000" '
                f'value="{round(self.shown() * 1000)}"></progress> <b>{frac * 100:.0f}%</b> · {html.escape(text)} · '
                f'{format_seconds(self.clock() - self.t0)} so far</div>')


def streamed(job: Callable[[ProgressFn], Any], live: LiveStatus, n_outputs: int, status: int = 0,
             every: float = 0.5) -> Iterator[Any]:
    """Run ``job(progress)`` in a thread and yield the status line (``live.html()``, other outputs kept)
    every ``every`` seconds until it ends; then yield its result (or raise its error)."""
    result: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        try:
            result["out"] = job(live)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
            result["error"] = e
        finally:
            done.set()

    threading.Thread(target=work, daemon=True, name="uadlab-job").start()
    while not done.wait(every):
        out = [gr.skip()] * n_outputs
        out[status] = live.html()
        yield tuple(out) if n_outputs > 1 else out[0]
    if "error" in result:
        raise result["error"]
    yield result["out"]


def open_workspace(user: str | None) -> Workspace:
    if not valid_user_id(user):
        raise gr.Error("the session is not ready yet: reload the page")
    return Workspace(user)


def reporter(progress: gr.Progress | ProgressFn | None) -> ProgressFn:
    """A ProgressFn that moves gradio's progress bar (the job's share, the stage with counts and ETA); a
    ProgressFn (a ``LiveStatus``) is used as it is."""
    if progress is None:
        return lambda p: None
    if not isinstance(progress, gr.Progress):
        return progress
    return lambda p: progress(p.overall if p.overall is not None else p.fraction, desc=p.text)
