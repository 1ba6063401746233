"""Atomic writes (``uadlab.fsio``) and the LRU cache (``uadlab.lru``): the helpers every writer and cache shares."""
import json
import threading

import numpy as np
import pytest

from uadlab.fsio import replacing, write_atomic
from uadlab.lru import LRU


def _hammer(writers, reader, rounds: int) -> list[BaseException]:
    """Run each writer ``rounds`` times in its own thread while ``reader`` runs until they finish."""
    errors: list[BaseException] = []
    done = threading.Event()

    def loop(fn, i):
        try:
            for r in range(rounds):
                fn(i, r)
        except BaseException as e:  # noqa: BLE001 - collected and asserted in the main thread
            errors.append(e)

    def read():
        try:
            while not done.is_set():
                reader()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=loop, args=(fn, i)) for i, fn in enumerate(writers)]
    watcher = threading.Thread(target=read)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    return errors


def test_two_threads_writing_one_json_file_never_leave_it_broken(tmp_path):
    path = tmp_path / "data.json"
    write_atomic(path, "{}")
    seen = []

    def write(i, r):  # big enough that a torn write would be visible
        write_atomic(path, json.dumps({"writer": i, "round": r, "pad": "x" * (20_000 + r)}))

    def read():
        seen.append(json.loads(path.read_text())["writer"] if path.read_text() != "{}" else None)

    errors = _hammer([write, write], read, rounds=300)
    assert not errors, errors[:3]
    assert json.loads(path.read_text())["round"] == 299
    assert {0, 1} & set(seen)  # the reader did read while they wrote
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]  # no temporary file left behind


def test_two_tabs_setting_preferences_at_once(tmp_path):
    """Two tabs of one workspace write prefs.json at once (it used one fixed temporary name: the second rename
    failed with FileNotFoundError, or published the other tab's half-written file)."""
    from uadlab.workspace import Workspace

    ws = Workspace("ab" * 8, root=tmp_path)
    prefs = ws.dir / "prefs.json"
    ws.set_pref("tab", -1)

    def read():
        json.loads(prefs.read_text())

    errors = _hammer([lambda i, r: ws.set_pref(f"tab{i}", r)] * 2, read, rounds=100)
    assert not errors, errors[:3]
    assert {"tab0", "tab1"} <= set(json.loads(prefs.read_text()))
    assert not [p for p in ws.dir.iterdir() if p.name.endswith(".tmp")]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "run.json"
    write_atomic(path, b'{"ok": 1}')
    with pytest.raises(RuntimeError):
        with replacing(path) as tmp:
            tmp.write_text('{"half')
            raise RuntimeError("disk full")
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_lru_keeps_the_most_recently_used():
    made = []
    cache = LRU(2)

    def get(k):
        return cache.get(k, lambda: made.append(k) or k.upper())

    assert [get("a"), get("b"), get("a"), get("c")] == ["A", "B", "A", "C"]  # c evicts b, the least recent
    assert made == ["a", "b", "c"] and "a" in cache and "b" not in cache
    get("b")
    assert made[-1] == "b" and "c" in cache and "a" not in cache
    cache.drop(lambda k: k == "c")
    assert len(cache) == 1


def test_lru_by_weight_keeps_the_newest_ones():
    cache = LRU(None, weigh=lambda v: v.nbytes, budget=100, keep=2)
    for k in "abc":
        cache.put(k, np.zeros(80, np.uint8))  # two exceed the budget but stay: an image and its mask
    assert ("a" in cache, "b" in cache, "c" in cache) == (False, True, True)
    cache.put("d", np.zeros(10, np.uint8))
    cache.put("e", np.zeros(10, np.uint8))
    assert len(cache) == 3  # 80 + 10 + 10 bytes: within the budget
    cache.put("f", np.zeros(10, np.uint8))
    assert "c" not in cache and len(cache) == 3
