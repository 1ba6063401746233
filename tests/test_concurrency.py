"""Concurrent writers: the feature cache and the annotation store, hammered from threads AND processes.

Run with ``-s`` to see the counts, e.g. ``cache: 4 threads x 20 puts + 2 processes x 10 puts: 0 failures``.
"""
from __future__ import annotations

import multiprocessing as mp
import threading
import traceback

import torch

from uadlab.features import FeatureCache, PatchFeatures
from uadlab.workspace.store import AnnotationStore

THREADS, THREAD_ITERS, PROCS, PROC_ITERS = 4, 20, 2, 10
FP, KEY = "tiny|packaged|64->64|stage2", "k" * 32


def _feats(seed: int) -> PatchFeatures:
    """Random features that float16 holds exactly (the cache stores float16), so a read-back equals them."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).half().float()  # noqa: E731
    return PatchFeatures({"stage2": r(1, 8, 4, 4), "stage3": r(1, 16, 2, 2)}, (64, 64), r(1, 16))


def _cache_worker(root: str, iters: int, wid: int, sync=lambda: None) -> list[str]:
    """Put one key again and again, reading it back between puts; return the failures."""
    cache, want, errors = FeatureCache(root), _feats(0), []
    for i in range(iters):
        sync()
        try:
            cache.put(FP, KEY, want)
            got = cache.get(FP, KEY)
            if got is None or not all(torch.equal(got.maps[l].float(), want.maps[l]) for l in want.layers) \
                    or not torch.equal(got.cls.float(), want.cls) or got.image_size != (64, 64):
                errors.append(f"worker {wid} iteration {i}: read back a missing or different entry")
        except Exception:  # noqa: BLE001 - counted, then asserted to be zero
            errors.append(traceback.format_exc(limit=2))
    return errors


def _store_worker(path: str, iters: int, wid: int, sync=lambda: None) -> list[str]:
    """Per step, first-save the new sample ``s<step>`` that all workers save (label from even workers, note
    from odd ones), then one sample of this worker's own."""
    errors = []
    try:
        store = AnnotationStore(path)  # several processes may create the database at once
    except Exception:  # noqa: BLE001
        return [traceback.format_exc(limit=2)]
    for i in range(iters):
        sync()
        try:
            if wid % 2:
                store.save("u", "d", f"s{i}", note=f"note {wid}")
            else:
                store.save("u", "d", f"s{i}", label="anomalous")
            store.save("u", "d", f"w{wid}-{i}", label="normal", note=str(i))
        except Exception:  # noqa: BLE001
            errors.append(traceback.format_exc(limit=2))
    return errors


def _hammer(worker, target: str) -> tuple[list[str], str]:
    """Run ``worker`` in THREADS threads and PROCS spawned processes at the same time."""
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(THREADS)  # the threads start every step together: first saves collide

    def run(wid: int) -> None:
        out = worker(target, THREAD_ITERS, wid, barrier.wait)
        with lock:
            errors.extend(out)

    ctx = mp.get_context("spawn")
    with ctx.Pool(PROCS) as pool:
        async_res = [pool.apply_async(worker, (target, PROC_ITERS, THREADS + j)) for j in range(PROCS)]
        threads = [threading.Thread(target=run, args=(w,)) for w in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in async_res:
            errors.extend(r.get(timeout=120))
    return errors, f"{THREADS} threads x {THREAD_ITERS} + {PROCS} processes x {PROC_ITERS}"


def test_feature_cache_concurrent_puts_of_one_key(tmp_path):
    errors, what = _hammer(_cache_worker, str(tmp_path / "cache"))
    print(f"\ncache: {what} puts of one key: {len(errors)} failures")
    assert not errors, errors[:3]
    files = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert files == ["backbone.json", f"{KEY}.safetensors"]  # no temporary file left behind
    got = FeatureCache(tmp_path / "cache").get(FP, KEY)
    assert torch.equal(got.maps["stage3"].float(), _feats(0).maps["stage3"])


def test_feature_cache_damaged_entry_is_a_miss(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.put(FP, KEY, _feats(1))
    path = next(tmp_path.rglob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:50])  # truncated, e.g. by a full disk
    assert cache.get(FP, KEY) is None and not path.exists()


def test_store_concurrent_first_saves(tmp_path):
    db = str(tmp_path / "a.sqlite")
    errors, what = _hammer(_store_worker, db)
    store = AnnotationStore(db)
    rows = store.list("u", "d")
    want = THREAD_ITERS + THREADS * THREAD_ITERS + PROCS * PROC_ITERS
    print(f"\nstore: {what} first saves of a shared new sample + one own sample each: {len(errors)} failures, "
          f"{len(rows)}/{want} rows")
    assert not errors, errors[:3]
    assert len(rows) == want  # no lost rows
    for i in range(THREAD_ITERS):  # partial updates from different writers kept both fields
        shared = store.get("u", "d", f"s{i}")
        assert shared.label == "anomalous" and shared.note.startswith("note "), (i, shared)
    assert store.get("u", "d", "w5-9").note == "9"
