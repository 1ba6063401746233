"""torchrun with 2 CPU processes (gloo) gives the run of one process: same banks, AUROC within 0.005."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uadlab import distributed


@pytest.mark.parametrize("n,world", [(11, 2), (10, 3), (2, 4), (0, 2)])
def test_shards_cover_every_item_once_in_order(n, world):
    parts = [list(range(n))[distributed.shard(n, r, world)] for r in range(world)]
    assert sum(parts, []) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # uneven n: sizes differ by one at most


def test_one_process_helpers_are_the_identity():
    t = torch.arange(6.0).view(3, 2)
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.all_gather_cat(t) is t


def _fit(cmd, data, out, cache):
    env = {**os.environ, "UADLAB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    args = ["-m", "uadlab", "fit", "--data", str(data), "--categories", "brick", "--methods",
            "patchcore,anomalydino", "--image-size", "64", "--out", str(out)]
    r = subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    runs = list(Path(out).iterdir())
    assert len(runs) == 1, "exactly one run written (rank 0 only)"
    return runs[0]


def test_torchrun_two_processes_equal_one(tmp_path):
    from uadlab.data import load_data
    from uadlab.demo import make_demo
    from uadlab.pipeline import Run

    data = make_demo(tmp_path / "demo", categories=("brick",), n_train=11, n_test_good=4, n_test_per_defect=2, size=96)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    # separate caches: the 2-process run extracts its features itself (sharded), not from the first run's cache
    one = Run.load(_fit([sys.executable], data, tmp_path / "one", tmp_path / "c1"))
    two = Run.load(_fit(torchrun, data, tmp_path / "two", tmp_path / "c2"))
    assert two.meta["world_size"] == 2 and one.meta["world_size"] == 1
    pc1, pc2 = one.heads["patchcore"], two.heads["patchcore"]
    assert pc1.memory_bank.shape == pc2.memory_bank.shape  # same bank size (two-round coreset over the union)
    assert pc2.fit_record.details["world_size"] == 2
    assert torch.allclose(one.heads["anomalydino"].memory_bank, two.heads["anomalydino"].memory_bank, atol=1e-5)
    test = load_data(str(data)).test
    r1, r2 = one.evaluate(test, record=False), two.evaluate(test, record=False)
    for m in ("patchcore", "anomalydino"):
        assert abs(r1[m]["image_auroc"] - r2[m]["image_auroc"]) <= 0.005, (m, r1[m]["image_auroc"], r2[m]["image_auroc"])


def _ranks(r, world, port, q):
    """One rank of a gloo group: gathers uneven tensors and averages gradients of an uneven batch."""
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
        q.put((r, got.tolist(), lin.weight.grad.tolist(), mine.stop - mine.start))  # lists: no shared memory
    finally:
        dist.destroy_process_group()


def test_gather_and_gradient_average_over_two_gloo_processes():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ranks, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    out = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1)
    x, y = torch.randn(5, 3), torch.randn(5, 1)
    ((lin(x) - y) ** 2).mean().backward()  # the one-process gradient of the whole batch
    for r, got, grad, n_local in out:
        assert got == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]  # uneven sizes, rank order
        assert n_local == (3, 2)[r]
        assert torch.allclose(torch.tensor(grad), lin.weight.grad, atol=1e-6)
