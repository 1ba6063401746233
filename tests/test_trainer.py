"""The shared training loop: held-out selection, early stopping, a refit's fixed budget, progress."""
import pytest
import torch

from uadlab.trainer import TrainConfig, train


def _toy(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(32, generator=g)
    torch.manual_seed(seed)
    net = torch.nn.Linear(4, 1)
    return net, x, y


def test_selects_the_best_held_out_epoch_and_restores_it():
    net, x, y = _toy()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    # held-out loss that is lowest at epoch 3 by construction (it ignores the weights); the state of epoch 3 is kept
    fake = iter([5.0, 4.0, 1.0, 2.0, 3.0, 4.0])
    states = []
    rec = train(net, opt, lambda idx, g: (net(x[idx]).squeeze(1) - y[idx]).pow(2).mean(), len(x),
                TrainConfig(epochs=6, batch_size=8), val_loss=lambda: (states.append(net.weight.clone()), next(fake))[1])
    assert rec.best_epoch == 3 and rec.selection == "val_loss" and rec.epochs == 6 and rec.steps == 24
    assert torch.equal(net.weight, states[2]) and not torch.equal(states[2], states[5])
    assert not net.training


def test_patience_stops_and_budget_trains_exactly():
    net, x, y = _toy()
    loss = lambda idx, g: (net(x[idx]).squeeze(1) - y[idx]).pow(2).mean()  # noqa: E731
    val = lambda: float((net(x).squeeze(1) - y).pow(2).mean())  # noqa: E731
    seen = []
    rec = train(net, torch.optim.SGD(net.parameters(), lr=0.01), loss, len(x),
                TrainConfig(epochs=50, batch_size=8, patience=3, min_delta=0.99), val_loss=val, progress=seen.append)
    # only a 99% drop counts as better: epoch 1 stays best, three stale epochs later training stops
    assert rec.best_epoch == 1 and rec.epochs == 4 and rec.stopped_early and len(rec.val_loss) == 4
    assert seen[-1].done == 16 and seen[-1].total == 200 and seen[-1].loss is not None
    net2, x, y = _toy()
    rec2 = train(net2, torch.optim.SGD(net2.parameters(), lr=0.01), loss, len(x),
                 TrainConfig(epochs=50, batch_size=8, patience=3), val_loss=val, budget=7)
    assert rec2.epochs == 7 and rec2.steps == 28 and rec2.selection == "budget" and rec2.val_loss == []


def test_config_is_checked():
    with pytest.raises(ValueError, match="select"):
        TrainConfig(epochs=1, batch_size=1, select="test_auroc")
    with pytest.raises(ValueError, match="patience"):
        TrainConfig(epochs=1, batch_size=1, patience=0)
    assert TrainConfig(epochs=40, batch_size=8, max_steps=120).planned_epochs(16) == 40
    assert TrainConfig(epochs=40, batch_size=8, max_steps=120).planned_epochs(100) == 9  # 13 steps an epoch


def test_an_interrupted_training_resumes_to_the_same_result(tmp_path):
    """A checkpoint after every epoch; a second start of the same training continues from it and ends where an
    uninterrupted one ends (weights, optimiser, scheduler, batch order, selection); the file goes when done."""
    def run(ckpt=None, stop_at=None, key="k"):
        net, x, y = _toy()
        opt = torch.optim.AdamW(net.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + 0.1 * s))
        calls = [0]

        def loss(idx, g):
            calls[0] += 1
            if stop_at is not None and calls[0] > stop_at:
                raise KeyboardInterrupt  # the process dies mid-epoch
            noise = torch.randn(len(idx), generator=g)  # the method's own draws come from the loop's generator
            return (net(x[idx]).squeeze(1) - y[idx] - 0.01 * noise).pow(2).mean()

        val = lambda: float((net(x).squeeze(1) - y).pow(2).mean())  # noqa: E731
        rec = train(net, opt, loss, len(x), TrainConfig(epochs=6, batch_size=8), val_loss=val, scheduler=sched,
                    checkpoint=ckpt, key=key, checkpoint_every_s=0)
        return net, rec

    ref, ref_rec = run()
    path = tmp_path / "ckpt.safetensors"
    with pytest.raises(KeyboardInterrupt):
        run(path, stop_at=13)  # 4 steps an epoch: dies in epoch 4, after the checkpoint of epoch 3
    assert path.exists()
    net, rec = run(path)
    assert torch.equal(net.weight, ref.weight) and rec == ref_rec and not path.exists()
    with pytest.raises(KeyboardInterrupt):
        run(path, stop_at=13)
    other, _ = run(path, key="other data")  # another training never resumes this one's state
    assert torch.equal(other.weight, ref.weight)
