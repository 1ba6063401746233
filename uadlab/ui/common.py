"""What every screen of the app shares: error handling, the workspace of a session, progress."""
from __future__ import annotations

import functools
import inspect
import logging
import traceback
from typing import Callable

import gradio as gr

from .. import safety as S, tokens
from ..errors import UadlabError
from ..progress import ProgressFn
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
    outputs keep what they show (instead of gradio blanking every output with "Error")."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as e:
            out = [gr.skip()] * n_outputs
            out[status] = error_text(e.message)
            return tuple(out) if n_outputs > 1 else out[0]

    return wrapper


def open_workspace(user: str | None) -> Workspace:
    if not valid_user_id(user):
        raise gr.Error("the session is not ready yet: reload the page")
    return Workspace(user)


def reporter(progress: gr.Progress) -> ProgressFn:
    """A ProgressFn that moves gradio's progress bar (the job's share, the stage with counts and ETA)."""
    return lambda p: progress(p.overall if p.overall is not None else p.fraction, desc=p.text)
