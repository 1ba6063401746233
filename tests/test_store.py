"""Annotations and reviews in SQLite: saved at once, isolated per user, exportable, usable as labels."""
from __future__ import annotations

import sqlite3
import zipfile

import numpy as np
import pytest
from PIL import Image

from uadlab.data import load_mvtec
from uadlab.workspace.store import AnnotationStore


@pytest.fixture
def images(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / "imgs" / f"img{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((32, 40, 3), 40 * i, np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _mask(h=32, w=40):
    m = np.zeros((h, w), np.uint8)
    m[5:15, 10:20] = 1
    return m


def test_save_get_partial_updates_and_restart(tmp_path, images):
    db = tmp_path / "ws" / "uadlab.sqlite"
    st = AnnotationStore(db)
    a = st.save("u1", "demo/brick", "a/img0.png", label="anomalous", image_path=images[0])
    assert a.label == "anomalous" and a.mask is None and a.note == ""
    st.save("u1", "demo/brick", "a/img0.png", mask=_mask())
    st.save("u1", "demo/brick", "a/img0.png", note="crack near the edge")
    again = AnnotationStore(db).get("u1", "demo/brick", "a/img0.png")  # a "restart": a new store object
    assert again.label == "anomalous" and again.note == "crack near the edge"
    assert again.mask_pixels == 100 and again.mask.shape == (32, 40)
    assert again.updated >= again.created
    st.save("u1", "demo/brick", "a/img0.png", mask=None)
    assert st.get("u1", "demo/brick", "a/img0.png").mask is None
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        cols = [r[1] for t in ("annotations", "reviews") for r in con.execute(f"PRAGMA table_info({t})")]
    assert not any("token" in c for c in cols)


def test_bad_label_and_verdict_are_refused(tmp_path):
    st = AnnotationStore(tmp_path / "db.sqlite")
    with pytest.raises(ValueError, match="label"):
        st.save("u1", "d", "s", label="broken")
    with pytest.raises(ValueError, match="verdict"):
        st.set_review("u1", "d", "s", "run", "patchcore", "maybe")


def test_users_are_isolated(tmp_path, images):
    st = AnnotationStore(tmp_path / "db.sqlite")
    st.save("alice", "d", "img0", label="normal", image_path=images[0])
    st.set_review("alice", "d", "img0", "r1", "patchcore", "agree")
    assert st.get("bob", "d", "img0") is None
    assert st.list("bob") == [] and st.reviews("bob", "d", "img0", "r1") == {}
    assert st.counts("alice", "d") == {"normal": 1}


def test_reviews_update_and_summary(tmp_path):
    st = AnnotationStore(tmp_path / "db.sqlite")
    st.set_review("u", "d", "img0", "r1", "patchcore", "agree")
    st.set_review("u", "d", "img0", "r1", "patchcore", "disagree")  # changed mind: one row, updated
    st.set_review("u", "d", "img1", "r1", "patchcore", "agree")
    st.set_review("u", "d", "img1", "r1", "anomalydino", "agree")
    assert st.reviews("u", "d", "img0", "r1") == {"patchcore": "disagree"}
    assert st.review_summary("u", "r1") == {"patchcore": {"agree": 1, "disagree": 1},
                                            "anomalydino": {"agree": 1, "disagree": 0}}
    st.set_review("u", "d", "img1", "r1", "anomalydino", None)
    assert "anomalydino" not in st.review_summary("u", "r1")


def test_annotations_as_samples(tmp_path, images):
    st = AnnotationStore(tmp_path / "db.sqlite")
    st.save("u", "d", "n0", label="normal", image_path=images[0])
    st.save("u", "d", "a1", label="anomalous", mask=_mask(), image_path=images[1])
    st.save("u", "d", "a2", label="anomalous", image_path=images[2])  # no mask painted
    st.save("u", "d", "q", label="unsure", image_path=images[2])
    mem = Image.fromarray(np.full((32, 40, 3), 99, np.uint8))
    st.save("u", "d", "hf/0001", label="anomalous", mask=_mask(), image=mem)  # in-memory image (no path)
    samples = {s.name: s for s in st.to_samples("u", "d")}
    assert set(samples) == {"n0", "a1", "a2", "hf/0001"}
    assert samples["n0"].label == 0 and samples["a1"].label == 1
    assert samples["a1"].load_mask().sum() == 100 and samples["a2"].load_mask() is None
    assert samples["hf/0001"].load().size == (40, 32)
    aux = {s.name for s in st.to_samples("u", "d", require_masks=True)}
    assert aux == {"n0", "a1", "hf/0001"}  # SPG's auxiliary set: anomalous images need masks


def test_export_mvtec_zip_loads_back(tmp_path, images):
    from uadlab.data import Sample

    st = AnnotationStore(tmp_path / "db.sqlite")
    st.save("u", "d", "cat/test/x/n0.png", label="normal", image_path=images[0])
    st.save("u", "d", "cat/test/x/a1.png", label="anomalous", mask=_mask(), image_path=images[1])
    st.save("u", "d", "cat/test/x/q.png", label="unsure", image_path=images[2])
    train = [Sample("t0.png", images[0], label=0), Sample("t1.png", images[2], label=0)]
    out = st.export_mvtec_zip("u", "d", tmp_path / "out" / "ann.zip", category="brick", train=train)
    with zipfile.ZipFile(out) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "unz")
    assert "brick/ground_truth/anomalous/cat_test_x_a1_mask.png" in names
    assert not any("q" in n.rsplit("/", 1)[-1] for n in names)  # unsure is left out
    ds = load_mvtec(tmp_path / "unz" / "brick")
    assert len(ds.train) == 2 and sorted(s.label for s in ds.test) == [0, 1]
    anomalous = next(s for s in ds.test if s.label == 1)
    assert anomalous.load_mask().sum() == 100
