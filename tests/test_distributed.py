"""torchrun with 2 CPU processes (gloo) gives the run of one process: same banks, AUROC within 0.005."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uadlab import distributed
from uadlab.methods.patchcore import kcenter_greedy


@pytest.mark.parametrize("n,world", [(11, 2), (10, 3), (2, 4), (0, 2)])
def test_shards_cover_every_item_once_in_order(n, world):
    parts = [list(range(n))[distributed.shard(n, r, world)] for r in range(world)]
    assert sum(parts, []) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # uneven n: sizes differ by one at most


def test_one_process_helpers_are_the_identity():
    t = torch.arange(6.0).view(3, 2)
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.all_gather_cat(t) is t


METHODS = ["patchcore", "anomalydino", "dinomaly", "spatial_ar", "varad", "spg", "intensity", "ensemble"]


def _fit(cmd, data, out, cache):
    env = {**os.environ, "UADLAB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    args = ["-m", "uadlab", "fit", "--data", str(data), "--categories", "grass", "--methods", ",".join(METHODS),
            "--preset", "tiny", "--image-size", "64", "--out", str(out)]
    r = subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=600,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    runs = list(Path(out).iterdir())
    assert len(runs) == 1, "exactly one run written (rank 0 only)"
    return runs[0]


def test_torchrun_two_processes_equal_one(tmp_path):
    """Every method, trained by one process and by two under torchrun: the same heads up to rounding (the
    same PatchCore bank: the exact distributed greedy), so the same scores and image AUROC within 0.005."""
    from uadlab.data import load_data
    from uadlab.demo import make_demo
    from uadlab.pipeline import Run

    # grass with a second category: SPG's auxiliary set is brick's labelled test images
    data = make_demo(tmp_path / "demo", categories=("grass", "brick"), n_train=11, n_test_good=4,
                     n_test_per_defect=2, size=96)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    # separate caches: the 2-process run extracts its features itself (sharded), not from the first run's cache
    one = Run.load(_fit([sys.executable], data, tmp_path / "one", tmp_path / "c1"))
    two = Run.load(_fit(torchrun, data, tmp_path / "two", tmp_path / "c2"))
    assert two.meta["world_size"] == 2 and one.meta["world_size"] == 1
    pc1, pc2 = one.heads["patchcore"], two.heads["patchcore"]
    assert pc2.fit_info["world_size"] == 2 and pc2.fit_info["distributed_coreset"] == "exact"
    assert torch.allclose(pc1.memory_bank, pc2.memory_bank, atol=1e-6)  # the same rows in the same order
    assert torch.allclose(one.heads["anomalydino"].memory_bank, two.heads["anomalydino"].memory_bank, atol=1e-5)
    test = load_data(str(data), categories=["grass"]).test
    s1, s2 = one.score(test), two.score(test)
    r1, r2 = one.evaluate(test, record=False), two.evaluate(test, record=False)
    for m in METHODS:
        assert abs(r1[m]["image_auroc"] - r2[m]["image_auroc"]) <= 0.005, (m, r1[m]["image_auroc"], r2[m]["image_auroc"])
        scale = max(1e-6, float(abs(s1[m].scores).max()))
        assert abs(s1[m].scores - s2[m].scores).max() <= 1e-3 * scale, m  # the scores, not only their ranking


CORESET_PARTS = [(170, 130), (0, 300)]  # rows per rank in the distributed greedy


def _ranks(r, world, port, q):
    """One rank of a gloo group: gathers uneven tensors, averages gradients of an uneven batch, and runs the
    exact distributed greedy on its own rows (``CORESET_PARTS``)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=world)
    try:
        got = distributed.all_gather_cat(torch.full((r + 1, 2), float(r)))  # rank r sends r + 1 rows
        torch.manual_seed(0)
        lin = torch.nn.Linear(3, 1)
        x, y = torch.randn(5, 3), torch.randn(5, 1)  # a batch of 5 over the ranks: parts of 3 and 2
        mine = distributed.local_part(len(x))
        ((lin(x[mine]) - y[mine]) ** 2).mean().backward()
        distributed.average_gradients(lin.parameters(), len(x))
        picks = []
        for sizes in CORESET_PARTS:
            start = sum(sizes[:r])
            z = _points(sum(sizes))[start:start + sizes[r]].clone()
            picks.append((sizes, kcenter_greedy(z, 60, seed=0, candidates=16, sharded=True).tolist()))
        q.put((r, got.tolist(), lin.weight.grad.tolist(), mine.stop - mine.start, picks))  # lists: no shared memory
    finally:
        dist.destroy_process_group()


def _spawn(target, world: int, *args) -> list:
    """Run ``target(rank, world, port, queue, *args)`` in ``world`` spawned gloo processes; their results, by rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, port, q, *args)) for r in range(world)]
    for p in procs:
        p.start()
    out = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    return out


def _points(n):
    g = torch.Generator().manual_seed(7)  # clusters of different spread, so the greedy has clear choices
    return torch.randn(n, 24, generator=g) * torch.linspace(0.2, 2, 24) + 3 * (torch.arange(n) % 5)[:, None]


def test_gather_gradient_average_and_exact_greedy_over_two_gloo_processes():
    out = _spawn(_ranks, 2)  # one spawn for all checks: starting processes is the slow part
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1)
    x, y = torch.randn(5, 3), torch.randn(5, 1)
    ((lin(x) - y) ** 2).mean().backward()  # the one-process gradient of the whole batch
    for r, got, grad, n_local, picks in out:
        assert got == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]  # uneven sizes, rank order
        assert n_local == (3, 2)[r]
        assert torch.allclose(torch.tensor(grad), lin.weight.grad, atol=1e-6)
        # the exact distributed greedy: each rank holds only its rows (uneven parts; a rank with none),
        # and every rank picks what one process picks
        for sizes, idx in picks:
            assert idx == kcenter_greedy(_points(sum(sizes)).clone(), 60, seed=0, candidates=16).tolist(), (r, sizes)
