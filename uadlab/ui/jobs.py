"""Long jobs per session: one visitor cannot fill the queue that every visitor shares.

gradio's queue holds at most ``max_size`` events for everybody; without a per-session limit, one client that
submits 32 trainings fills it and the next visitor gets "503 queue full". Each long job's event therefore
has a ``validator``, which gradio runs when the event is SUBMITTED (before it enters the queue, for the
browser and for API clients alike): it takes a ticket of ``workspace.JOBS`` for the session's workspace,
or refuses with a clear message ("you already have a training queued") when the session already holds
``UADLAB_MAX_JOBS_PER_SESSION`` of that kind. The job gives its ticket back when it ends, whatever the outcome.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import gradio as gr

from ..safety import QuotaError, limits
from ..workspace import JOBS

_BLOCKS: list[gr.Blocks] = []  # the app, to ask its queue whether a queued event still exists


def bind(demo: gr.Blocks) -> None:
    """Let the tickets see the app's queue (``build_app`` calls this)."""
    _BLOCKS[:] = [demo]


def _alive(kind: str) -> Callable[[str], bool]:
    """Whether a session (gradio session hash) still has a ``kind`` event queued or running. A browser that
    went away has its queued events dropped by gradio without running them: their tickets must not count.
    Where the queue cannot be read, every ticket counts (they still expire after ``JOBS.max_wait``)."""

    def alive(session: str) -> bool:
        try:
            q = _BLOCKS[0]._queue
            ids = q.pending_event_ids_session.get(session, set())
            return any(getattr(q.event_ids_to_events.get(i), "fn", None) is not None
                       and getattr(q.event_ids_to_events[i].fn.validator, "job_kind", None) == kind for i in ids)
        except (IndexError, AttributeError, KeyError, TypeError):
            return True

    return alive


def validator(kind: str, fn: Callable, show_on: str | None = None) -> Callable:
    """The validator of ``fn``'s event: a ticket for one more ``kind`` job of the session, or a refusal.

    It takes the same inputs as ``fn`` (the first is the workspace id) and answers one ``gr.validate`` per
    input: all valid, or the message under the input named ``show_on`` (default: under every input).
    """
    names = [p for p in inspect.signature(fn).parameters if p != "progress"]
    if show_on is not None and show_on not in names:
        raise ValueError(f"{fn.__name__} has no input {show_on!r} to show a refusal under")

    def check(*args: Any, request: gr.Request | None = None) -> list:
        user = str(args[0] or "") if args else ""
        session = getattr(request, "session_hash", None) or ""
        try:  # a ticket just taken is not in the queue yet: ``reserve`` asks ``alive`` only about older ones
            JOBS.reserve(f"{kind}:{user}", limits().jobs_per_session, session, kind, _alive(kind))
        except QuotaError as e:
            return [gr.validate(show_on not in (None, n), "" if show_on not in (None, n) else str(e)) for n in names]
        return [gr.validate(True, "") for _ in names]

    check.job_kind = kind  # type: ignore[attr-defined]
    check.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
        + [inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=gr.Request)])
    return check


def holding(kind: str, fn: Callable) -> Callable:
    """``fn`` run under the session's ticket for ``kind`` (taken by ``validator``), which it gives back at the end."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        user = str(args[0] or "") if args else ""
        with JOBS.held_by(f"{kind}:{user}"):
            return fn(*args, **kwargs)

    return wrapper


__all__ = ["bind", "holding", "validator"]
