"""Every job is bounded, disks stay within their quotas: the per-session job limit on a real Gradio server, the
tickets behind it, the disk caps (zip members, notes, all workspaces together, a run's estimated size) and
the voxel caps of scans.
"""
from __future__ import annotations

import socket
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import load_data
from uadlab import medical
from uadlab.data import DataError, load_data as load_any, safe_extract_zip
from uadlab.safety import QuotaError
from uadlab.workspace.session import Jobs


# ---- one visitor cannot fill the queue --------------------------------------------------------------------
def test_job_tickets_per_session():
    jobs = Jobs()
    jobs.reserve("training:a", 1, "sa")
    with pytest.raises(QuotaError, match="you already have a training queued"):
        jobs.reserve("training:a", 1, "sa")
    jobs.reserve("training:b", 1, "sb")  # another session is not held up
    with jobs.held_by("training:a"):
        with pytest.raises(QuotaError, match="you already have a training running"):
            jobs.reserve("training:a", 1, "sa")
    jobs.reserve("training:a", 1, "sa")  # given back when it ended
    assert jobs.count("training:a") == 1
    # a queued submission its browser abandoned (gradio dropped the event) does not count, once it is not fresh
    old = Jobs(min_age=0)
    old.reserve("training:c", 1, "gone")
    old.reserve("training:c", 1, "sc", alive=lambda holder: holder != "gone")
    with pytest.raises(QuotaError):
        old.reserve("training:c", 1, "sc", alive=lambda holder: holder != "gone")


@pytest.fixture(scope="module")
def server(app):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp = pytest.MonkeyPatch()
    mp.setenv("UADLAB_EXAMPLE", "0")
    demo = app.serve("127.0.0.1", port, prevent_thread_lock=True)
    yield {"app": app, "url": f"http://127.0.0.1:{port}/"}
    demo.close()
    mp.undo()


def _session(server, tmp_path: Path, name: str):
    """A gradio client on its own session and workspace, with the demo loaded."""
    from gradio_client import Client

    app = server["app"]
    user = app.header.on_start(None)[0]
    load_data(app, user, "Demo (offline)", category="brick")
    client = Client(server["url"], verbose=False, download_files=str(tmp_path / name))
    client.predict(user, api_name="/on_switch_workspace")
    return client


def test_second_training_of_a_session_is_refused_on_a_real_server(server, tmp_path):
    """Through gradio's HTTP API, as an API client (or a second browser tab) would: while session A's training
    is queued or running, A's next submission is refused at once with a clear message, and session B's passes."""
    a, b = _session(server, tmp_path, "a"), _session(server, tmp_path, "b")
    args = dict(backbone=None, methods=["anomalydino"], preset="quick", image_size=None,
                aux_source="other categories", token="", window="auto", api_name="/on_train")
    first = a.submit(**args)
    deadline = time.time() + 60
    while first.status().code.name not in ("PROCESSING", "IN_QUEUE", "ITERATING") and not first.done():
        assert time.time() < deadline, first.status()
        time.sleep(0.05)
    with pytest.raises(Exception, match="you already have a training (queued|running)"):
        a.predict(**args)
    other = b.submit(**args)  # another session: accepted (queued behind A, then trained)
    out_a, out_b = first.result(timeout=600), other.result(timeout=600)
    assert "trained and saved" in out_a[0] and "trained and saved" in out_b[0]
    # A's ticket was given back: A may train again
    assert "trained and saved" in a.predict(**args)[0]
