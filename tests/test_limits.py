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
    from uadlab.ui import jobs

    alive = jobs._alive("training")  # what lets a ticket of a dropped submission go: gradio's queue, read live
    assert alive(a.session_hash) and not alive(b.session_hash) and not alive("no-such-session")
    refused = 0
    for _ in range(8):  # what filled gradio's queue before: every further submission of A is refused at once
        with pytest.raises(Exception, match="you already have a training (queued|running)"):
            a.predict(**args)
        refused += 1
    print(f"\nsession A: 1 training accepted, {refused} more refused at submission")
    other = b.submit(**args)  # another session: accepted (queued behind A, then trained)
    out_a, out_b = first.result(timeout=600), other.result(timeout=600)
    assert "trained and saved" in out_a[0] and "trained and saved" in out_b[0]
    # A's ticket was given back: A may train again
    assert "trained and saved" in a.predict(**args)[0]


# ---- disk quotas ------------------------------------------------------------------------------------------------
def _pngs(d: Path, n: int, side: int = 32) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        out.append(str(d / f"img{i}.png"))
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(out[-1])
    return out


def _ws(tmp_path: Path, monkeypatch, **env):
    from uadlab.workspace import Workspace, new_user_id

    monkeypatch.setenv("UADLAB_WORKSPACE", str(tmp_path / "ws"))
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    return Workspace(new_user_id())


def test_zip_unpacks_only_images_and_says_so(tmp_path, monkeypatch):
    """A small zip of large non-image members: only the images are unpacked; the rest is listed as skipped."""
    from uadlab.safety import disk_usage

    ws = _ws(tmp_path, monkeypatch)
    z = tmp_path / "mixed.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in _pngs(tmp_path / "src", 3):
            zf.write(p, f"data/{Path(p).name}")
        for i in range(3):
            zf.writestr(f"data/blob{i}.bin", b"\0" * 8 * 2**20)  # 8 MiB each, compresses to a few KB
        zf.writestr("data/readme.txt", "hello")
    before = disk_usage(ws.dir)
    choice = ws.data.add_zip(z)
    ds = ws.data.set(choice)
    after = disk_usage(ws.dir)
    print(f"\nzip of 3 PNGs + 24 MiB of other members ({z.stat().st_size:,} B): workspace {before:,} -> {after:,} B")
    assert after - before < 100_000 and len(ds.train) == 3
    assert not list((ws.data.uploads / choice["id"]).rglob("*.bin"))
    assert any("blob0.bin: not an image, mask or scan (not kept)" in w for w in ds.warnings)
    assert any("readme.txt" in w for w in ds.warnings)
    # the Python API the same way
    api = load_any(str(z))
    assert len(api.train) == 3 and sum("(not kept)" in w for w in api.warnings) == 4
    skipped: list[str] = []
    safe_extract_zip(z, tmp_path / "raw", images_only=True, skipped=skipped)
    assert sorted(skipped) == ["data/blob0.bin", "data/blob1.bin", "data/blob2.bin", "data/readme.txt"]


def test_notes_have_a_size_limit(tmp_path):
    from uadlab.workspace.store import MAX_NOTE_CHARS, AnnotationStore
    from uadlab.ui.annotate_tab import _short

    store = AnnotationStore(tmp_path / "a.sqlite")
    store.save("u", "d", "s", note="fine")
    before = (tmp_path / "a.sqlite").stat().st_size
    with pytest.raises(ValueError, match=r"the note has 10,001 characters; the limit is 10,000"):
        store.save("u", "d", "s", note="x" * (MAX_NOTE_CHARS + 1))
    assert store.get("u", "d", "s").note == "fine"  # nothing saved
    print(f"\na note of {MAX_NOTE_CHARS + 1:,} characters refused; database {before:,} -> "
          f"{(tmp_path / 'a.sqlite').stat().st_size:,} B")
    shown = _short("y" * MAX_NOTE_CHARS)
    assert len(shown) < 120 and "10,000 characters" in shown  # the status line never echoes a long note


def test_all_workspaces_share_one_disk_cap(tmp_path, monkeypatch):
    """New sessions do not bring a fresh quota: past UADLAB_MAX_DISK_BYTES for all workspaces together, the
    next upload of any session is refused."""
    from uadlab import workspace as W
    from uadlab.safety import disk_usage

    ws = _ws(tmp_path, monkeypatch, UADLAB_MAX_DISK_BYTES=60_000)
    files = _pngs(tmp_path / "src", 3, side=64)  # ~37 KB
    accepted, refused = 0, None
    for i in range(10):
        W._TOTAL.clear()  # the walk is cached for 5 s; a test has no 5 s to wait
        s = W.Workspace(W.new_user_id())
        try:
            s.data.add_files(files)
            accepted += 1
        except QuotaError as e:
            refused = str(e)
            break
    total = disk_usage(ws.root)
    print(f"\n10 sessions under a 60,000 B cap: {accepted} uploads accepted, then refused; all workspaces {total:,} B")
    assert accepted >= 1 and refused is not None and "server's disk space for workspaces is used up" in refused
    assert total <= 60_000 + 1_000_000  # the cap (plus the database file)


def test_a_run_past_the_quota_is_refused_before_it_starts(tmp_path, monkeypatch):
    """The memory bank's size is estimated from the data and the backbone: a run that would not fit is refused
    before any fitting (nothing written), and the estimate bounds what a run that fits writes."""
    from uadlab.safety import disk_usage

    ws = _ws(tmp_path, monkeypatch)
    ws.data.set(ws.data.add_files(_pngs(tmp_path / "src", 6)))
    used = disk_usage(ws.dir)
    monkeypatch.setenv("UADLAB_MAX_WORKSPACE_BYTES", str(used + 20_000))
    with pytest.raises(QuotaError, match=r"this workspace is full.*an estimate of this run"):
        ws.runs.train(["anomalydino"], image_size=64)
    assert not any(ws.runs.dir.iterdir()) and disk_usage(ws.dir) == used
    monkeypatch.setenv("UADLAB_MAX_WORKSPACE_BYTES", str(2**30))
    run_id, _ = ws.runs.train(["anomalydino"], image_size=64)
    written = disk_usage(ws.runs.dir / run_id)
    estimate = ws.runs.get(run_id).meta["estimated_bytes"]
    print(f"\nquota {used + 20_000:,} B: refused before it started ({used:,} B before and after); the run that fit: "
          f"estimate {estimate:,} B, written {written:,} B")
    assert written <= estimate <= 2 * written + 200_000


# ---- scans -----------------------------------------------------------------------------------------------------
def test_nifti_slices_are_views_and_non_finite_voxels_are_background(tmp_path):
    v = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    v[0, 0, :] = np.nan
    v[1, 1, :] = -np.inf
    nib.save(nib.Nifti1Image(v, np.eye(4)), str(tmp_path / "v.nii.gz"))
    vol = medical.nifti_volume(tmp_path / "v.nii.gz")
    for axis in range(3):
        assert np.shares_memory(medical.take_slice(vol, axis, 1), vol)  # no copy per slice
    assert np.isfinite(vol).all() and vol[0, 0, 0] == vol[1, 1, 0] == np.nanmin(np.where(np.isfinite(v), v, np.nan))
    slices, _ = medical.nifti_slices(str(tmp_path / "v.nii.gz"), "v.nii.gz", axis="z")
    assert len(slices) == 3


def test_upload_voxel_cap(tmp_path, monkeypatch):
    ws = _ws(tmp_path, monkeypatch, UADLAB_MAX_UPLOAD_VOXELS=1000)
    p = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 8), np.float32), np.eye(4)), str(p))
    with pytest.raises(QuotaError, match=r"the scans of the upload hold 0 million voxels; the limit per upload"):
        ws.data.add_files([str(p)])
    z = tmp_path / "v.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(p, "vols/v.nii.gz")
    with pytest.raises(QuotaError, match="the limit per upload"):
        ws.data.add_zip(z)
    assert not any(ws.data.uploads.iterdir())  # the refused zip's files went with it


def test_volume_declaring_too_many_voxels_is_refused_from_its_header(tmp_path):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1024, 1024, 256))
    hdr.set_data_dtype(np.int16)
    (tmp_path / "bomb.nii").write_bytes(hdr.binaryblock + b"\0" * 4)
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"bomb\.nii: 1024x1024x256 voxels \(268 million\), more than the limit"):
        load_any(str(tmp_path / "bomb.nii"))
    assert time.perf_counter() - t0 < 5  # refused from the header: nothing decompressed
    assert medical.declared_voxels(tmp_path / "bomb.nii") == 1024 * 1024 * 256


def test_annotations_of_scans_export(tmp_path, monkeypatch):
    """Annotating NIfTI slices and DICOM frames, then exporting: PNGs rendered through the reader (no
    Image.open on a .dcm / .nii.gz), masks at the slice's size; annotations as labelled samples keep the reader."""
    from meddata import make_brain_set, pydicom_file

    ws = _ws(tmp_path, monkeypatch)
    brain = make_brain_set(tmp_path / "brain", n_train=1, n_good=1, n_lesion=0)
    nii = sorted((brain / "brain").rglob("*.nii.gz"))
    ws.data.set(ws.data.add_files([str(nii[0])], [str(nii[1]), str(pydicom_file("MR_small.dcm"))],
                                  unmasked_test_normal=True))
    samples, key = ws.annotations.images()
    kinds = {type(s.source).__name__: i for i, s in enumerate(samples)}
    assert set(kinds) == {"NiftiSlice", "DicomFrame"}
    for name, i in kinds.items():
        w, h = samples[i].load().size
        m = np.zeros((h, w), np.uint8)
        m[: h // 2, : w // 2] = 1
        ws.annotations.save(i, "anomalous", m, f"{name} lesion")
    out = ws.annotations.export()
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        for name, i in kinds.items():
            short = samples[i].name.split("/")[-1].replace("#", "_")
            stem = [n for n in names if "/test/anomalous/" in n and short in n]
            assert stem, (name, names)
            img = Image.open(zf.open(stem[0]))
            mask = Image.open(zf.open(stem[0].replace("/test/anomalous/", "/ground_truth/anomalous/")
                                      .replace(".png", "_mask.png")))
            assert img.size == mask.size == samples[i].load().size
            assert np.asarray(mask).astype(bool).sum() == (img.size[0] // 2) * (img.size[1] // 2)
    labelled = ws.annotations.samples(key)
    assert len(labelled) == 2 and all(s.source is not None and s.label == 1 for s in labelled)
    assert all(s.load_mask().sum() > 0 and s.load().size == s.load_mask().shape[::-1] for s in labelled)


def test_loose_uploads_keep_only_images(tmp_path, monkeypatch):
    from uadlab.safety import disk_usage

    ws = _ws(tmp_path, monkeypatch)
    other = tmp_path / "src" / "model.bin"
    other.parent.mkdir(parents=True, exist_ok=True)
    other.write_bytes(b"\0" * 2**20)
    before = disk_usage(ws.dir)
    ds = ws.data.set(ws.data.add_files(_pngs(tmp_path / "src", 3) + [str(other)]))
    after = disk_usage(ws.dir)
    assert len(ds.train) == 3 and after - before < 50_000
    assert ds.warnings == ["skipped model.bin: not an image, mask or scan (not kept)"]
    with pytest.raises(DataError, match=r"model\.bin: not images, masks or scans"):
        ws.data.add_files([str(other)])
    assert len(list(ws.data.uploads.iterdir())) == 1  # the refused upload left nothing


def test_dicom_float_pixels_with_nan(tmp_path):
    """Float pixel data: NaN takes the frame's lowest finite value; a frame of NaN only is refused by name."""
    import pydicom
    from meddata import pydicom_file

    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    a = ds.pixel_array.astype(np.float32)
    a[:4, :4] = np.nan
    assert medical.finite_or_background(a, "x")[0, 0] == np.nanmin(a)
    with pytest.raises(DataError, match=r"frame 3: no finite intensity \(all 16 values"):
        medical.finite_or_background(np.full((4, 4), np.inf, np.float32), "frame 3")
