import io
import os
import warnings
import zipfile

import numpy as np
import pytest
from PIL import Image

from uadlab.data import (DataError, Sample, load_data, load_files, load_folder, load_hf, load_mvtec, load_zip,
                         open_image, safe_extract_zip, validate)


def _png(path, arr, mode=None):
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def test_image_modes_become_rgb(tmp_path):
    g = _png(tmp_path / "g.png", np.full((20, 30), 128, np.uint8))
    i16 = tmp_path / "i16.png"
    Image.fromarray(np.linspace(0, 65535, 600).reshape(20, 30).astype(np.uint16)).save(i16)
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :15, 3] = 255  # left half opaque red, right half transparent
    ra = _png(tmp_path / "a.png", rgba)
    pal = tmp_path / "p.png"
    Image.fromarray(np.full((20, 30, 3), (0, 200, 0), np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE).save(pal)
    for p in (g, i16, ra, pal):
        im = open_image(p)
        assert im.mode == "RGB" and im.size == (30, 20)
    a = np.asarray(open_image(i16))
    assert a.min() == 0 and a.max() == 255  # 16-bit rescaled by its range, not clipped
    a = np.asarray(open_image(ra))
    assert tuple(a[0, 0]) == (255, 0, 0) and tuple(a[0, -1]) == (0, 0, 0)
    assert tuple(np.asarray(open_image(pal))[0, 0]) == (0, 200, 0)


def test_bad_files_name_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, "PNG")
    (tmp_path / "trunc.png").write_bytes(buf.getvalue()[:60])
    for name, msg in [("empty.png", "empty"), ("text.png", "not an image"), ("trunc.png", "corrupt")]:
        with pytest.raises(DataError, match=msg) as e:
            open_image(tmp_path / name)
        assert name in str(e.value)


def test_skip_bad_with_warning(tmp_path):
    _png(tmp_path / "ok.png", np.zeros((16, 16, 3), np.uint8))
    (tmp_path / "bad.jpg").write_text("nope")
    with pytest.raises(DataError, match="bad.jpg"):
        load_folder(tmp_path)
    with warnings.catch_warnings(record=True):
        ds = load_folder(tmp_path, skip_bad=True)
    assert [s.name for s in ds.train] == ["ok.png"] and "bad.jpg" in ds.warnings[0]


def test_mask_size_mismatch_is_named(tmp_path):
    img = _png(tmp_path / "x.png", np.zeros((16, 16, 3), np.uint8))
    m = _png(tmp_path / "x_mask.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="x_mask.png.*8x8.*16x16"):
        validate([Sample("x.png", str(img), label=1, mask_path=str(m))])


def test_mvtec_layout_several_categories(tiny_demo):
    ds = load_mvtec(tiny_demo)
    assert ds.categories == ["brick", "grass", "gravel"]
    assert len(ds.train) == 30 and len(ds.test) == 3 * (4 + 4 * 2)
    anomalous = [s for s in ds.test if s.label == 1]
    assert all(s.mask_path for s in anomalous) and ds.has_masks
    m = anomalous[0].load_mask()
    assert set(np.unique(m)) <= {0, 1} and m.sum() > 0
    one = load_mvtec(tiny_demo / "grass")
    assert one.categories == ["grass"]
    with pytest.raises(DataError, match="wood"):
        load_mvtec(tiny_demo, categories=["wood"])


def test_mvtec_without_masks_reports_missing(tiny_demo, tmp_path):
    import shutil

    shutil.copytree(tiny_demo / "brick", tmp_path / "brick", ignore=shutil.ignore_patterns("ground_truth"))
    ds = load_mvtec(tmp_path)
    assert not ds.has_masks and any(s.label == 1 for s in ds.test)


def test_zip_is_unpacked_safely(tmp_path, tiny_demo):
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as z:
        for p in (tiny_demo / "brick").rglob("*.png"):
            z.write(p, "wrapped/brick/" + str(p.relative_to(tiny_demo / "brick")))
    ds = load_zip(good, tmp_path / "out")
    assert len(ds.train) == 10 and len(ds.test) == 12
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../../escape.txt", "x")
    with pytest.raises(DataError, match="unsafe path"):
        safe_extract_zip(evil, tmp_path / "out2")
    assert not (tmp_path / "escape.txt").exists()
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as z:
        info = zipfile.ZipInfo("a_link")
        info.external_attr = (0o120777 << 16)
        z.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="symbolic link"):
        safe_extract_zip(link, tmp_path / "out3")
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros.bin", b"\0" * 2_000_000)
    with pytest.raises(DataError, match="limit"):
        safe_extract_zip(big, tmp_path / "out4", max_bytes=1_000_000)
    (tmp_path / "notzip.zip").write_text("no")
    with pytest.raises(DataError, match="notzip.zip"):
        safe_extract_zip(tmp_path / "notzip.zip", tmp_path / "out5")


def test_uploaded_files(tmp_path):
    a = _png(tmp_path / "a.png", np.zeros((16, 16, 3), np.uint8))
    s = load_files([a], label=0)
    assert s[0].name == "a.png" and s[0].label == 0


def test_hf_dataset_offline(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)) for _ in range(6)]
    masks = [Image.fromarray((rng.random((24, 24)) > 0.8).astype(np.uint8) * 255) for _ in range(6)]
    feats = datasets.Features({"img": datasets.Image(), "is_anomaly": datasets.Value("int64"), "gt": datasets.Image()})
    d = tmp_path / "hfds"
    (d / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"img": imgs[:4], "is_anomaly": [0, 0, 0, 1], "gt": masks[:4]}, features=feats) \
        .to_parquet(str(d / "data" / "train-00000.parquet"))
    datasets.Dataset.from_dict({"img": imgs[4:], "is_anomaly": [0, 1], "gt": masks[4:]}, features=feats) \
        .to_parquet(str(d / "data" / "test-00000.parquet"))
    ds = load_hf(str(d), image_column="img", label_column="is_anomaly", mask_column="gt", local=True)
    assert len(ds.train) == 3  # the anomalous training row is dropped: train on normals only
    assert [s.label for s in ds.test] == [0, 1] and ds.test[1].load_mask().shape == (24, 24)
    with pytest.raises(DataError, match="no column 'pixels'"):
        load_hf(str(d), image_column="pixels", label_column="is_anomaly", local=True)
    ds2 = load_data("hf:" + str(d), image_column="img", label_column="is_anomaly")
    assert len(ds2.train) == 3


def _hf_parquet(d, imgs, masks, datasets):
    """A dataset as the Hub stores it: parquet files per split under data/ (columns img, is_anomaly, gt)."""
    feats = datasets.Features({"img": datasets.Image(), "is_anomaly": datasets.Value("int64"), "gt": datasets.Image()})
    (d / "data").mkdir(parents=True)
    for split, rows, labels in (("train", slice(0, 4), [0, 0, 0, 1]), ("test", slice(4, 6), [0, 1])):
        datasets.Dataset.from_dict({"img": imgs[rows], "is_anomaly": labels, "gt": masks[rows]}, features=feats) \
            .to_parquet(str(d / "data" / f"{split}-00000.parquet"))
    return d


def test_hf_streaming_reads_rows_into_files(tmp_path):
    """``streaming=True``: the same samples as a full load, but each one a file (nothing held in memory); the
    files hold the rows' bytes unchanged (a 16-bit PNG stays 16-bit) and go with the dataset."""
    import gc

    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)) for _ in range(5)]
    imgs.append(Image.fromarray(rng.integers(0, 65535, (24, 24), dtype=np.uint16)))  # 16-bit grey
    masks = [Image.fromarray((rng.random((24, 24)) > 0.8).astype(np.uint8) * 255) for _ in range(6)]
    d = _hf_parquet(tmp_path / "hfds", imgs, masks, datasets)
    kw = dict(image_column="img", label_column="is_anomaly", mask_column="gt", local=True)
    full, streamed = load_hf(str(d), **kw), load_hf(str(d), streaming=True, **kw)
    assert [s.name for s in streamed.train] == [s.name for s in full.train] == ["train/00000", "train/00001",
                                                                              "train/00002"]
    assert [(s.name, s.label) for s in streamed.test] == [(s.name, s.label) for s in full.test] == \
        [("test/00000", 0), ("test/00001", 1)]
    for a, b in zip(full.train + full.test, streamed.train + streamed.test):
        assert b.image is None and b.mask is None and os.path.isfile(b.path) and os.path.isfile(b.mask_path)
        np.testing.assert_array_equal(np.asarray(a.load()), np.asarray(b.load()))
        np.testing.assert_array_equal(a.load_mask(), b.load_mask())
    assert Image.open(streamed.test[1].path).mode.startswith("I;16")
    assert len(load_hf(str(d), streaming=True, limit=2, **kw).train) == 2
    assert len(load_data("hf:" + str(d), streaming=True, image_column="img", label_column="is_anomaly").train) == 3
    spool = os.path.dirname(os.path.dirname(streamed.train[0].path))
    del streamed
    gc.collect()
    assert not os.path.exists(spool)  # the temporary folder goes with the dataset
    kept = load_hf(str(d), streaming=True, spool=tmp_path / "spool", **kw)
    assert sorted(os.listdir(tmp_path / "spool")) == ["test", "train"] and kept.owner is None


def test_hf_streaming_stops_at_the_limit(monkeypatch):
    """A stream is read no further than ``limit`` rows (here a row past it would fail), and a stream that breaks
    off is one clear error naming the row."""
    datasets = pytest.importorskip("datasets")

    def rows():
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(buf, format="PNG")
            yield {"image": {"bytes": buf.getvalue(), "path": None}, "label": 0}
        raise ConnectionError("the connection was reset")

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    stream = lambda *a, **k: datasets.IterableDatasetDict(  # noqa: E731
        train=datasets.IterableDataset.from_generator(rows, features=feats))
    monkeypatch.setattr(datasets, "load_dataset", stream)
    events = []
    ds = load_hf("someone/endless", streaming=True, limit=3, progress=events.append)
    assert [np.asarray(s.load())[0, 0, 0] for s in ds.train] == [0, 40, 80]
    assert events[-2].text == "reading train of hf:someone/endless: 2/3 rows"  # no ETA before a few rows are read
    assert events[-1].text == "reading train of hf:someone/endless: 3/3 rows" and events[-1].overall == 1.0
    with pytest.raises(DataError, match=r"hf:someone/endless/train: cannot read row 3 \(ConnectionError"):
        load_hf("someone/endless", streaming=True)


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_rows_cannot_name_files_of_this_machine(tmp_path, monkeypatch, streaming):
    """A Hub dataset whose image cells hold a path instead of bytes reads that path only where ``datasets``
    downloads to: anything else on a shared server (another user's images) is refused, naming the row."""
    datasets = pytest.importorskip("datasets")
    secret = _png(tmp_path / "someone_elses.png", np.full((16, 16, 3), 7, np.uint8))
    feats = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
    rows = datasets.Dataset.from_dict({"image": [{"bytes": None, "path": str(secret)}], "label": [0]}, features=feats)
    rows = rows.cast_column("image", datasets.Image())
    fake = lambda *a, streaming=False, **k: datasets.IterableDatasetDict(train=rows.to_iterable_dataset()) \
        if streaming else datasets.DatasetDict(train=rows)  # noqa: E731
    monkeypatch.setattr(datasets, "load_dataset", fake)
    with pytest.raises(DataError, match=r"train/00000: the row names a file of this machine"):
        load_hf("someone/crafted", streaming=streaming)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))  # a file datasets downloaded
    ds = load_hf("someone/crafted", streaming=streaming)  # kept: a streamed dataset owns its files
    assert np.asarray(ds.train[0].load())[0, 0, 0] == 7


def test_load_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_data(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_data(str(tmp_path / "empty"))
