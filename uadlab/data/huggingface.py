"""Hugging Face datasets (the Hub or a local folder): the label mapping, image cells spooled to files as they
are, streaming up to a limit.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from .. import tokens
from ..errors import DataError, short_reason as _reason
from ..fsio import replacing
from ..progress import Progress, ProgressFn, Stages
from ..tokens import scrub
from .samples import Dataset, NORMAL_NAMES, Sample, _bad, is_normal_name, validate


def label_mapping(feature: Any, values: Iterable[Any], where: str, check_normal: bool = True) -> dict[Any, int]:
    """Each label value of a Hugging Face column -> 0 (normal), 1 (anomalous) or -1 (no label).

    Class NAMES decide, never class indices: a ``ClassLabel`` index becomes its name first (``imagefolder``
    sorts classes, so ``crack`` = 0 and ``good`` = 1). Strings are names; booleans and plain integers must be
    0/1 (0 = normal). A dataset with no class recognised as normal is refused, listing its classes.

    Args:
        feature: the column's feature (``datasets.ClassLabel``, ``datasets.Value``, ...).
        values: the distinct values found in the column.
        where: dataset name for messages.
        check_normal: refuse a set of classes without a normal one (off while a stream is still being read).
    """
    import datasets

    values = list(values)
    if isinstance(feature, datasets.ClassLabel):
        classes = list(feature.names)
        out = {}
        for v in values:
            if v is None or v == -1:  # datasets' "no label"
                out[v] = -1
            elif not (isinstance(v, (int, np.integer)) and 0 <= v < len(classes)):
                raise DataError(f"{where}: label {v!r} is not one of the {len(classes)} classes {classes}")
            else:
                out[v] = 0 if is_normal_name(classes[v]) else 1
    elif all(v is None or isinstance(v, str) for v in values):
        classes = sorted(str(v) for v in values if v is not None)
        out = {v: -1 if v is None else 0 if is_normal_name(v) else 1 for v in values}
    elif all(v is None or isinstance(v, (bool, int, np.integer, np.bool_)) for v in values):
        bad = sorted(v for v in values if v is not None and v not in (0, 1))
        if bad:
            raise DataError(f"{where}: labels {bad[:5]} are not 0 (normal) or 1 (anomalous); use 0/1 or class "
                            "names such as good / crack")
        return {v: -1 if v is None else int(v) for v in values}
    else:
        raise DataError(f"{where}: label values such as {values[:3]!r} are neither class names nor 0/1")
    if check_normal and classes and not any(is_normal_name(c) for c in classes):
        raise DataError(f"{where}: no class is recognised as normal (classes: {', '.join(classes)}); the normal "
                        f"class must be named one of {', '.join(sorted(NORMAL_NAMES))}")
    return out


def _open_hf(repo_id: str, config: str | None, token: str | bool, local: bool, streaming: bool = False):
    """A ``datasets.DatasetDict`` (``IterableDatasetDict`` with ``streaming``) from the Hub, or with ``local``
    from a folder (saved with ``save_to_disk``, or files that ``load_dataset`` reads: parquet, image folders)."""
    import datasets

    path = Path(repo_id)
    if path.exists():
        if not local:
            raise DataError(f"hf:{repo_id}: not a Hub dataset id (owner/name); local paths are not allowed here")
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            dd = datasets.load_from_disk(str(path))
            dd = dd if isinstance(dd, datasets.DatasetDict) else datasets.DatasetDict(train=dd)
            if streaming:  # a saved dataset streams from its arrow files
                return datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in dd.items()})
            return dd
    return datasets.load_dataset(repo_id, config, token=token, streaming=streaming)


_FORMAT_EXT = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "BMP": ".bmp", "WEBP": ".webp"}


def _cell_image(cell: Any, name: str, token: str | bool, local: bool) -> tuple[bytes, Image.Image]:
    """The bytes and the (lazily decoded) image of one undecoded image cell (``{"bytes", "path"}``).

    A cell with only a path (image folders) is read from it: a URL of the dataset's host, a file that
    ``datasets`` downloaded into its caches, or with ``local`` any file of this machine. A Hub dataset whose
    cell names another file of this machine is refused: on a shared server it would read other files (other
    users' images) into this user's data.
    """
    data = cell.get("bytes") if isinstance(cell, dict) else None
    path = cell.get("path") if isinstance(cell, dict) else None
    if data is None and path:
        if not local and ("://" not in path or path.startswith("file:")) and not _in_hf_cache(path):
            raise DataError(f"{name}: the row names a file of this machine instead of holding an image")
        from datasets import DownloadConfig
        from datasets.utils.file_utils import xopen

        try:
            with xopen(path, "rb", download_config=DownloadConfig(token=token)) as f:
                data = f.read()
        except Exception as e:  # noqa: BLE001 - gone, unreachable or refused
            raise DataError(scrub(f"{name}: cannot read the image ({type(e).__name__}: {_reason(e)})",
                                  token)) from None
    if not data:
        raise DataError(f"{name}: the row holds no image")
    try:
        Image.open(io.BytesIO(data)).verify()  # the header and (PNG) the checksums; ``validate`` decodes it all
        return data, Image.open(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged bytes
        raise DataError(f"{name}: cannot decode the row ({_reason(e)})") from None


def _in_hf_cache(path: str) -> bool:
    """Whether ``path`` lies in the caches where ``datasets`` and ``huggingface_hub`` put downloaded files."""
    import datasets
    from huggingface_hub import constants

    real = Path(path.removeprefix("file://")).resolve()
    return any(real.is_relative_to(Path(d).resolve())
               for d in (datasets.config.HF_DATASETS_CACHE, constants.HF_HUB_CACHE))


def _spool(data: bytes, img: Image.Image, dest: Path) -> str:
    """Writes an image's bytes to ``dest`` + the extension of its format, as they are (no re-encoding: a
    16-bit PNG stays 16-bit); formats that folders do not read become PNG. Returns the file's path."""
    ext = _FORMAT_EXT.get(img.format)
    out = dest.with_suffix(ext or ".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as tmp:  # another load of the same rows may read ``out``
        if ext:
            tmp.write_bytes(data)
        else:
            img.save(tmp, format="PNG")
    return str(out)


def load_hf(repo_id: str, split: str = "train", test_split: str | None = "test", image_column: str = "image",
            label_column: str | None = "label", mask_column: str | None = None, category_column: str | None = None,
            config: str | None = None, token: tokens.Token = None, limit: int | None = None,
            skip_bad: bool = False, local: bool = False, streaming: bool = False,
            spool: str | os.PathLike | None = None, progress: ProgressFn | None = None) -> Dataset:
    """A Hugging Face dataset through ``datasets`` (Hub id; with ``local`` also a folder on this machine).

    The train split keeps only normal images (label 0, or all when there is no label column); labels follow
    ``label_mapping`` (class names, never indices). ``token``: the one to send (``True``: this machine's login;
    None: none, whatever ``HF_TOKEN`` holds, see ``tokens``); used for this call only, never in a message. Images are read from the cells' bytes (see ``_cell_image``: a Hub dataset cannot make
    this machine read its own files).

    Args:
        limit: read at most this many rows of each split.
        streaming: read the rows one at a time (``datasets``' streaming mode: nothing is downloaded up front,
            memory stays flat whatever the size): each image (and mask) is written as it comes to ``spool``,
            and the samples read those files, as a folder's do. Without it, ``datasets`` downloads and caches
            the whole dataset and the samples hold their images in memory.
        spool: the folder for streamed images; None: a temporary folder owned by the dataset (removed with it).
        progress: reports the rows read per split, out of the total where the dataset tells it.
    """
    import datasets

    token = tokens.for_request(token)
    where = f"hf:{Path(repo_id).name if local and os.path.exists(repo_id) else repo_id}"  # no server paths
    try:
        dd = _open_hf(repo_id, config, token, local, streaming)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - every loading failure becomes one clear message
        raise DataError(tokens.hub_message(e, "load the dataset", where, token)) from None
    if split not in dd:
        raise DataError(f"{where}: no split {split!r} (have {list(dd)})")
    if test_split is not None and test_split not in dd and test_split != "test":
        raise DataError(f"{where}: no split {test_split!r} (have {list(dd)})")
    parts = [p for p in (split, test_split) if p is not None and p in dd]
    for part in parts:
        if dd[part].features is None:  # a stream whose files carry no schema: read it from the first rows
            dd[part] = dd[part]._resolve_features()
        cols = list(dd[part].features)
        for col in (image_column, label_column, mask_column, category_column):
            if col is not None and col not in cols and not (col == label_column == "label"):
                raise DataError(f"{where}/{part}: no column {col!r} (have {cols})")
        feat = dd[part].features[image_column]
        if not isinstance(feat, datasets.Image):
            raise DataError(f"{where}/{part}: column {image_column!r} does not hold images (it holds {feat})")
    has_label = label_column is not None and all(label_column in dd[p].features for p in parts)
    feature = dd[split].features[label_column] if has_label else None
    labels: dict[Any, int] = {}
    if has_label and not streaming:
        try:
            values = {v for p in parts for v in dd[p].unique(label_column)}
        except TypeError:
            raise DataError(f"{where}: column {label_column!r} holds no labels (lists?)") from None
        labels = label_mapping(feature, values, where)
    owner = None
    if streaming and spool is None:
        owner = tempfile.TemporaryDirectory(prefix="uadlab-hf-")
        spool = owner.name
    ds = Dataset(where, owner=owner)
    stages = Stages(progress, [1] * len(parts))
    try:
        for part, target in ((split, ds.train), (test_split, ds.test)):
            if part in parts:
                report = stages.stage(f"reading {part} of {where}", "rows")
                rows = _hf_rows(dd[part], part, limit, streaming, where, token, report)
                for name, row in rows:
                    try:  # a stream meets its label values as it goes
                        if has_label and row[label_column] not in labels:
                            labels.update(label_mapping(feature, [row[label_column]], where, check_normal=False))
                    except TypeError:
                        raise DataError(f"{where}: column {label_column!r} holds no labels (lists?)") from None
                    label = labels[row[label_column]] if has_label else (0 if part == split else -1)
                    if part == split and label == 1:
                        continue  # train on normal images only
                    try:
                        s = _hf_sample(row, name, label, (image_column, mask_column, category_column),
                                       None if spool is None else Path(spool, *name.split("/")), token, local)
                    except DataError as e:
                        _bad(e, skip_bad, ds.warnings)
                        continue
                    # a stream is checked row by row, so that no image stays in memory
                    target.extend(validate([s], skip_bad, ds.warnings) if streaming else [s])
                if not streaming:
                    target[:] = validate(target, skip_bad, ds.warnings)
        if streaming and has_label:  # the whole check, now that the stream's label values are known
            label_mapping(feature, list(labels), where)
        if not ds.train:
            raise DataError(f"{where}: no normal training images in split {split!r}")
    except BaseException:
        if owner is not None:
            owner.cleanup()
        raise
    return ds


def _hf_rows(table: Any, part: str, limit: int | None, streaming: bool, where: str, token: str | bool,
             report: ProgressFn) -> Iterable[tuple[str, dict]]:
    """(name, row) of the first ``limit`` rows of one split, image cells undecoded (``{"bytes", "path"}``)."""
    import datasets

    for col, feat in table.features.items():
        if isinstance(feat, datasets.Image):
            table = table.cast_column(col, datasets.Image(decode=False))
    if not streaming:
        n = len(table) if limit is None else min(limit, len(table))
        for i in range(n):
            yield f"{part}/{i:05d}", table[i]
            report(Progress(i + 1, n))
        return
    info = table.info.splits.get(part) if table.info and table.info.splits else None
    known = [n for n in (limit, getattr(info, "num_examples", None)) if n]
    total = min(known) if known else 0  # 0: a stream of unknown length
    it = iter(table)
    i = 0
    while limit is None or i < limit:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - the network or a damaged file: the stream cannot go on
            raise DataError(scrub(f"{where}/{part}: cannot read row {i} ({type(e).__name__}: {_reason(e)})",
                                  token)) from None
        yield f"{part}/{i:05d}", row
        i += 1
        report(Progress(i, total))


def _hf_sample(row: dict, name: str, label: int, columns: tuple[str, str | None, str | None],
               spool: Path | None, token: str | bool, local: bool) -> Sample:
    """A Sample of one row: its image in memory, or with ``spool`` written to ``spool`` + extension (the mask
    too, when it is an image column)."""
    image_column, mask_column, category_column = columns
    data, img = _cell_image(row[image_column], name, token, local)
    s = Sample(name, label=label, category=str(row[category_column]) if category_column else "default")
    if spool is None:
        s.image = img
    else:
        s.path = _spool(data, img, spool)
    mask = row[mask_column] if mask_column else None
    if isinstance(mask, dict):  # an image column, undecoded
        mdata, mimg = _cell_image(mask, f"{name} (mask)", token, local)
        if spool is None:
            s.mask = np.asarray(mimg)
        else:
            s.mask_path = _spool(mdata, mimg, spool.with_name(spool.name + "_mask"))
    elif mask is not None:
        s.mask = np.asarray(mask)
    return s


