"""Hugging Face tokens: whose token a call sends, scrubbing tokens from text, and what a Hub failure means.

A server (a Space) may hold its operator's token (env ``HF_TOKEN`` or ``hf auth login``); huggingface_hub and
datasets send that "ambient" token with every request unless a call says ``token=False``. So every Hub call
of uadlab resolves its token here, in one of two ways:

- ``for_request`` (datasets, heads, pushes): the token the caller gave, or NONE. ``True`` means "this
  machine's own login" and is for the CLI and notebooks, whose user owns the machine; the app passes a
  visitor's typed token (``visitor``), never ``True``, so a visitor never acts with the operator's token.
- ``for_backbone``: the caller's token, else the server's for the backbones the app lists (gated DINOv3 is
  why a Space sets ``HF_TOKEN``), else none.

Tokens are never stored or logged; ``scrub`` removes a given token AND the server's from any text, and
``hub_message`` is the one translation of Hub failures into user messages (data, heads, backbones).
"""
from __future__ import annotations

import os
from typing import Collection, Iterable, Union

from .errors import UadlabError

Token = Union[str, bool, None]  # a token, True (this machine's login), or None/False (none)


def clean(token: str | None) -> str | None:
    """A pasted token without surrounding blanks (None when empty); one with blanks inside is refused unread."""
    t = (token or "").strip()
    if not t:
        return None
    if any(c.isspace() or not c.isprintable() for c in t):
        raise UadlabError("the token has spaces or line breaks inside: paste it again (it is never shown or stored)")
    return t


def server_token() -> str | None:
    """The token this process would send by default (env ``HF_TOKEN``, or the login stored by ``hf auth login``)."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        return os.environ.get("HF_TOKEN") or None
    return get_token()


def visitor(typed: str | None) -> str | bool:
    """What an app call sends for a visitor: the token they typed, or ``False`` (none; never the server's)."""
    return clean(typed) or False


def for_request(token: Token) -> str | bool:
    """The ``token=`` argument for huggingface_hub / datasets: a given token, ``True`` -> this machine's login
    (when there is one), anything else -> ``False`` (send none, whatever the environment holds)."""
    if token is True:
        return server_token() or False
    if isinstance(token, str):
        return clean(token) or False
    return False


def for_backbone(repo_id: str, token: Token, listed: Collection[str]) -> str | bool:
    """The token that fetches a backbone's weights from ``repo_id``: the caller's, else the server's when
    the repository is one of the ``listed`` backbones' (gated DINOv3), else none."""
    if token is True or (isinstance(token, str) and token.strip()):
        return for_request(token)
    return (server_token() or False) if repo_id in listed else False


# ---- scrubbing -------------------------------------------------------------------------------------------------
def secret_variants(values: Iterable[object]) -> list[str]:
    """The strings to scrub for some pasted secrets and the server's token: each as given, stripped, and its
    longer pieces; longest first."""
    out = {x for v in [*values, server_token()] if isinstance(v, str) and v.strip()
           for x in (v, v.strip(), *(w for w in v.split() if len(w) >= 8))}
    return sorted(out, key=len, reverse=True)


def scrub(text: str, secrets: Token | Iterable[str] = None) -> str:
    """``text`` with every secret (a token as pasted, or ``secret_variants``) and the server's token as ``***``."""
    given = [secrets] if isinstance(secrets, (str, bool)) or secrets is None else list(secrets)
    for s in secret_variants(given):
        text = text.replace(s, "***")
    return text


# ---- Hub failures ------------------------------------------------------------------------------------------------
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("0", "", "false", "no")


def hub_message(e: BaseException, action: str, what: str, token: Token = None, hint: str = "") -> str:
    """One clear line for a failed Hub call (``cannot <action> <what>: why; what to do``), without any token.

    Args:
        e: the exception of huggingface_hub, datasets or the network.
        action: what was tried ("load", "push to", "download the weights of").
        what: the repository (or dataset) as the user named it.
        token: the token of the call (scrubbed, as the server's always is).
        hint: what to do when the Hub cannot be reached (e.g. an offline alternative).
    """
    from huggingface_hub import errors as E

    status = getattr(getattr(e, "response", None), "status_code", None)
    name = type(e).__name__
    head = f"cannot {action} {what}"
    unreachable = hint or "connect to the internet and try again"
    if isinstance(e, E.OfflineModeIsEnabled) or (_offline() and not isinstance(e, E.HFValidationError)):
        msg = (f"{head}: the Hugging Face Hub is not reachable here (offline mode, HF_HUB_OFFLINE=1, or no "
               f"internet); {unreachable}")
    elif isinstance(e, E.GatedRepoError):
        msg = f"{head}: the repository is gated; accept its terms on its Hub page, then give a token that has access"
    elif isinstance(e, E.RepositoryNotFoundError) or name in ("DatasetNotFoundError", "RevisionNotFoundError"):
        msg = f"{head}: not found on the Hub, or private (give a token with read access)"
    elif isinstance(e, E.LocalEntryNotFoundError):
        msg = f"{head}: the Hugging Face Hub is not reachable and it is not in the local cache; {unreachable}"
    elif isinstance(e, E.EntryNotFoundError):
        msg = f"{head}: a file is missing in the repository ({getattr(e, 'server_message', None) or e})"
    elif status in (401, 403):
        msg = (f"{head}: the Hub refused the credentials (HTTP {status}); use a token with WRITE access for "
               "pushing, and check the repository's owner")
    elif isinstance(e, E.HFValidationError):
        msg = f"{what!r} is not a valid repository id (expected owner/name)"
    elif isinstance(e, (ConnectionError, TimeoutError)) or "Connect" in name or "Timeout" in name:
        msg = f"{head}: cannot reach the Hugging Face Hub ({name}); {unreachable}"
    elif isinstance(e, E.HfHubHTTPError):
        msg = f"{head}: the Hub answered HTTP {status} ({getattr(e, 'server_message', None) or name})"
    else:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split()) or name
        msg = f"{head}: {name}: {reason}"
    return scrub(msg, token)
