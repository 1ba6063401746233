"""The one exception type of bad input, and token hygiene for messages.

Every problem a user can cause with a file, a dataset, a saved run or a Hub repository raises a
``UadlabError`` (``DataError`` for files and datasets, ``hub.HubError`` for the Hub) whose message names the
file and the problem in one line. The CLI prints it, the app shows it; neither shows a traceback.
"""
from __future__ import annotations


class UadlabError(Exception):
    """Bad input or an unusable file; the message names it and says what is wrong (never a token)."""


class DataError(UadlabError, ValueError):
    """A file, folder, archive, dataset entry or saved run that cannot be used."""


def short_reason(e: Exception) -> str:
    """An exception as a short one-line reason, without the absolute path that OSErrors carry."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(str(e).split()) or type(e).__name__
