"""The training step never waits for the device: no host sync on a step that does not log, a non-finite step
skipped on the device exactly as if it never happened, and a compiled model that does not recompile as packed
lengths change."""

import copy

import pytest
import torch
from test_train import tiny_config

from crossmae.data.loader import GlobalBatchOrder
from crossmae.engine import HostSyncCounter, Trainer, WarmupCosine, lr_at
from crossmae.model import ModelOutput, MultimodalCrossMAE


def batches(trainer: Trainer, count: int) -> list:
    """The run's first ``count`` batches, on the trainer's device."""
    order = GlobalBatchOrder(len(trainer.train_set), trainer.config.data.batch_size, trainer.config.train.seed)
    return [trainer.collator([trainer.train_set[i] for i in order.batch(k)]) for k in range(count)]


def test_a_non_logging_step_makes_no_host_sync(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.val_every=0"))
    first, second = batches(trainer, 2)
    trainer.train_step(first.to(trainer.device))  # the optimizer state is created here
    # moving the batch reads its host-side parts (a CPU machine can't tell them from device tensors): outside
    batch = second.to(trainer.device, non_blocking=True)
    with HostSyncCounter() as counter:
        metrics = trainer.train_step(batch)
    assert counter.ops > 200  # the whole forward, backward and update ran under the counter
    assert counter.syncs == 0 and counter.reads == 0, counter.names

    with HostSyncCounter() as counter:  # the counter sees what a logging step does
        trainer.metrics_row(metrics.tolist())
        float(metrics[0])
    assert counter.reads == 2 and counter.syncs >= 1


def clone_state(trainer: Trainer) -> dict:
    return copy.deepcopy({"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                          "updates": trainer.schedule.updates, "lr": trainer.schedule.lr})


def assert_same_state(a: dict, b: dict, where: str = "") -> None:
    def walk(x, y, path):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), f"{where}{path} differs"
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), f"{where}{path}: keys differ"
            for k in x:
                walk(x[k], y[k], f"{path}.{k}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), f"{where}{path}: lengths differ"
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{path}[{i}]")
        else:
            assert x == y, f"{where}{path}: {x} vs {y}"
    walk(a, b, "")


@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_a_skipped_step_leaves_weights_optimizer_and_schedule_as_if_it_never_happened(tmp_path, monkeypatch, bad):
    config = tiny_config(tmp_path / "a", "train.val_every=0", "train.warmup_steps=3")
    one, two, three = batches(Trainer(config), 3)
    clean = Trainer(tiny_config(tmp_path / "b", "train.val_every=0", "train.warmup_steps=3"))
    skipping = Trainer(config)
    assert_same_state(clone_state(clean), clone_state(skipping), "before: ")

    for trainer in (clean, skipping):
        trainer.train_step(one)
    before = clone_state(skipping)
    real_forward = MultimodalCrossMAE.forward
    hooks = []

    def poisoned(self, batch, normalizers=None):
        out = real_forward(self, batch, normalizers)
        if bad == "loss":
            return ModelOutput(out.loss * float("nan"), out.losses, out.sums, out.counts, out.predictions)
        first = next(p for p in self.parameters() if p.requires_grad)
        hooks.append(first.register_hook(lambda g: g * float("inf")))  # a finite loss, an infinite gradient
        return out

    with monkeypatch.context() as patch:
        patch.setattr(MultimodalCrossMAE, "forward", poisoned)
        metrics = skipping.metrics_row(skipping.train_step(two).tolist())
    assert metrics["skipped"] == 1.0
    assert_same_state(before, clone_state(skipping), "after the skipped step: ")
    for hook in hooks:
        hook.remove()
    for trainer in (clean, skipping):
        trainer.train_step(three)
    assert_same_state(clone_state(clean), clone_state(skipping), "one step later: ")


def test_the_schedule_counts_applied_updates_only():
    cfg = tiny_config("unused", "train.warmup_steps=3", steps=10).train
    schedule = WarmupCosine(cfg, torch.device("cpu"))
    applied = 0
    for skipped in [0, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0]:
        assert schedule.lr.item() == torch.tensor(lr_at(min(applied, cfg.max_steps), cfg), dtype=torch.float32)
        schedule.advance(torch.tensor(float(skipped)))
        applied += 1 - skipped
    assert schedule.updates.item() == applied


@pytest.mark.slow
def test_compiled_model_does_not_recompile_as_packed_lengths_change(tmp_path, monkeypatch):
    """6 batches of 6 different lengths through ``train.compile=true``: one compiled graph serves them all, and
    the attention stays an opaque custom op (the Triton op, interpreted on CPU; dynamo's ``aot_eager`` backend
    runs the graph here: it traces forward and backward as inductor would, without generating code)."""
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="aot_eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    small = ["train.val_every=0", "model.attn_backend=triton", "data.synthetic.grids=[precip]",
             "data.synthetic.series=[streamflow]", "data.synthetic.num_basins=6", "data.synthetic.missing_frames=0.3",
             "model.enc_depth=1"]
    trainer = Trainer(tiny_config(tmp_path, *small, "train.compile=true"))
    eager = Trainer(tiny_config(tmp_path / "eager", *small))
    data = batches(trainer, 6)
    assert len({b.num_tokens for b in data}) == 6, [b.num_tokens for b in data]
    for k, batch in enumerate(data):
        compiled_loss = trainer.train_step(batch)[0]
        if k == 0:  # same weights: the compiled step computes the eager step's loss
            torch.testing.assert_close(compiled_loss, eager.train_step(batch)[0], rtol=1e-5, atol=1e-6)
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 2, f"{graphs} graphs compiled for 6 batches"
    assert counters["frames"]["total"] <= 2 and not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


@pytest.mark.gpu
def test_a_cuda_step_runs_under_sync_debug_mode_error(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.val_every=0", "train.device=cuda"))
    first, second = batches(trainer, 2)
    trainer.train_step(first.to(trainer.device))
    batch = second.pin_memory().to(trainer.device, non_blocking=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        metrics = trainer.train_step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(metrics[0]).item()
