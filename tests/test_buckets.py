"""Bucketed batches (``crossmae/data/buckets.py``): the padded step computes the unbucketed step's loss and
gradients, the padding sample gets no loss weight and no gradient, and on CUDA the captured graphs replay across
batches of different lengths as the eager step computes."""

import copy

import pytest
import torch
from model_cases import SPEC, STEPS, collator_for, random_samples, small_model_config
from test_train import tiny_config
from test_train_step_sync import assert_same_state, clone_state

from crossmae.config import MaskConfig
from crossmae.data.buckets import ALIGN, Bucket, BucketSet, batch_totals, check_kinds, pad_batch
from crossmae.data.collate import _map_tensors
from crossmae.data.device import batch_tensors
from crossmae.data.loader import GlobalBatchOrder
from crossmae.engine import CudaGraphSteps, Trainer, _copy_into
from crossmae.model import MultimodalCrossMAE

OPTIONS = {
    "cross": {},
    "static_both_calendar": {"static": "both", "day_of_year": True},
    "fusion_fm_own": {"fusion_depth": 1, "use_weighted_fm": True, "memory": "own"},
    "standard_joint": {"use_cross_attn": False},
    "standard_own": {"use_cross_attn": False, "memory": "own"},
    "samples_reduction": {"loss_reduction": "samples", "decoder_self_attn": True},
    "memory_drop_standard": {"memory_drop": ["evap"], "use_cross_attn": False, "static": "token"},
}


def bucket_above(batch, extra: int = 70) -> Bucket:
    """A bucket ``extra`` rows (or more) above each of the batch's totals."""
    return Bucket(tuple((name, *(-(-(n + extra) // ALIGN) * ALIGN for n in parts))
                        for name, parts in batch_totals(batch).items()))


def as_float64(batch):
    """``batch`` with every floating tensor in float64 (indices, counts and boundaries as they are)."""
    return _map_tensors(batch, lambda t: t.double() if t.is_floating_point() else t, lambda p: p)


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    values = {}
    for name, mb in batch.modalities.items():
        mb.encoder.values = mb.encoder.values.clone().requires_grad_(True)
        values[name] = mb.encoder.values
    out = model(batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads, {n: v.grad for n, v in values.items()}


@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
@pytest.mark.parametrize("kept", [None, 0.3], ids=["all_hidden", "kept"])
def test_padded_batch_gives_the_same_loss_and_gradients(options, kept):
    """In float64 (the `math` backend), so that only a real difference shows: the same loss, sums and every
    parameter gradient to 1e-10 relative (the padded sums run over more, zero, terms in another order), the same
    counts exactly; the padding rows' targets weigh 0 and their input rows get a gradient of exactly 0."""
    cfg = small_model_config(attn_backend="math", **options)
    torch.manual_seed(0)
    model = MultimodalCrossMAE(SPEC, cfg, patch_size=4, steps=STEPS, fused=True).double()
    mask = MaskConfig(grid_ratio=0.6, series_ratio=0.5, kept_mask_ratio=kept)
    batch = as_float64(collator_for(cfg, mask)(random_samples(5, seed=1)))
    padded = pad_batch(batch, bucket_above(batch))
    assert padded.batch_size == batch.batch_size + 1
    for name, mb in padded.modalities.items():
        real = batch.modalities[name]
        assert mb.queries.packed.total > real.queries.packed.total
        assert torch.equal(mb.targets.weight[real.queries.packed.total:], torch.zeros_like(
            mb.targets.weight[real.queries.packed.total:]))
        assert (mb.queries.index[real.queries.packed.total:, 0] == batch.batch_size).all()

    out, grads, _ = loss_and_grads(model, batch)
    out_pad, grads_pad, input_grads = loss_and_grads(model, padded)
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out_pad.loss, out.loss, rtol=1e-10, atol=1e-12)
    for name in out.sums:
        torch.testing.assert_close(out_pad.sums[name], out.sums[name], rtol=1e-10, atol=1e-12)
        assert torch.equal(out_pad.counts[name], out.counts[name])
    assert grads.keys() == grads_pad.keys()
    for name, g in grads.items():
        scale = float(g.abs().max())
        torch.testing.assert_close(grads_pad[name], g, rtol=1e-10, atol=1e-10 * scale + 1e-15,
                                   msg=lambda m, n=name: f"{n}: {m}")
    for name, grad in input_grads.items():
        real = batch.modalities[name].encoder.visible.total
        if grad is not None:
            assert torch.equal(grad[real:], torch.zeros_like(grad[real:])), f"{name}: padding rows got a gradient"


def test_a_bucket_input_buffer_takes_every_tensor_of_the_next_batch():
    """What a replay reads: after ``_copy_into``, every tensor of the first padded batch (its buffers) holds the
    second's, and the model computes the second batch's loss from them (host-side fields, such as the counts for
    logs, are the first batch's: a replay reads none)."""
    cfg = small_model_config(use_cross_attn=False, static="both", day_of_year=True)
    collate = collator_for(cfg, MaskConfig(grid_ratio=0.6, series_ratio=0.5, kept_mask_ratio=0.3))
    first, second = (collate(random_samples(5, seed=s)) for s in (1, 2))
    bucket = BucketSet.from_totals([batch_totals(first), batch_totals(second)], count=1).buckets[0]
    static, new = pad_batch(first, bucket), pad_batch(second, bucket)
    _copy_into(static, new)
    pairs = list(zip(batch_tensors(static), batch_tensors(new), strict=True))
    assert len(pairs) > 40 and all(a is not b and torch.equal(a, b) for a, b in pairs)
    torch.manual_seed(0)
    model = MultimodalCrossMAE(SPEC, cfg, patch_size=4, steps=STEPS, fused=True)
    assert torch.equal(model(static).loss, model(new).loss)


def test_bucket_sizes_follow_the_quantile_rule_and_grow_for_a_larger_batch():
    totals = [{"a": (v, p, 0)} for v, p in [(10, 5), (130, 60), (70, 30), (300, 100)]]
    buckets = BucketSet.from_totals(totals, count=2)
    # nearest rank: k=0 → the 2nd smallest of 4, k=1 → the largest; rounded up to ALIGN
    assert [b.capacity for b in buckets.buckets] == [(("a", 128, 64, 0),), (("a", 320, 128, 0),)]
    assert buckets.choose({"a": (100, 64, 0)}).capacity == (("a", 128, 64, 0),)
    assert buckets.choose({"a": (100, 65, 0)}).capacity == (("a", 320, 128, 0),)
    grown = buckets.choose({"a": (400, 10, 3)})
    assert grown.capacity == (("a", 448, 128, 64),) and len(buckets.buckets) == 3
    assert len(BucketSet.from_totals(totals[:1], count=4).buckets) == 1  # identical buckets merge


def test_pad_batch_refuses_a_bucket_that_does_not_hold_the_batch_and_other_kinds():
    cfg = small_model_config()
    batch = collator_for(cfg)(random_samples(3))
    small = Bucket(tuple((name, 0, 0, 0) for name in batch.modalities))
    with pytest.raises(ValueError, match="does not hold"):
        pad_batch(batch, small)
    with pytest.raises(ValueError, match="sites"):
        check_kinds({"precip": "grid", "wells": "sites"}, "train.cuda_graphs")


def assert_same_weights(want: Trainer, got: Trainer, steps: int, rtol: float, atol: float) -> None:
    """Weights equal within ``rtol``/``atol``, but for the key biases: their gradient is 0 but for rounding (softmax
    ignores a shift shared by every key), and AdamW turns that noise into steps of up to lr, so they are compared
    to ``steps`` · lr."""
    lr = want.config.train.lr
    for (name, a), b in zip(want.model.named_parameters(), got.model.parameters()):
        if name.endswith(("attn.qkv.bias", "cross.kv.bias")):
            keys = slice(a.numel() // 3, 2 * a.numel() // 3) if "qkv" in name else slice(0, a.numel() // 2)
            torch.testing.assert_close(b[keys], a[keys], rtol=0, atol=steps * lr)
            rest = torch.ones(a.numel(), dtype=torch.bool, device=a.device)
            rest[keys] = False
            a, b = a[rest], b[rest]
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def run_batches(trainer: Trainer, count: int) -> list:
    order = GlobalBatchOrder(len(trainer.train_set), trainer.config.data.batch_size, trainer.config.train.seed)
    return [trainer.collator([trainer.train_set[i] for i in order.batch(k)]) for k in range(count)]


def test_a_bucketed_training_step_matches_the_unbucketed_one(tmp_path):
    """Through the trainer: the metric vectors (loss per modality, learning rate, gradient norm) of three steps and
    the weights after them agree to fp32 rounding."""
    plain = Trainer(tiny_config(tmp_path / "a", "train.val_every=0", "model.static=both"))
    bucketed = Trainer(tiny_config(tmp_path / "b", "train.val_every=0", "model.static=both"))
    data = run_batches(plain, 3)
    buckets = BucketSet.from_totals([batch_totals(b) for b in data], count=2)
    for batch in data:
        want = plain.train_step(batch)
        got = bucketed.train_step(pad_batch(batch, buckets.choose(batch_totals(batch))))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert_same_weights(plain, bucketed, steps=3, rtol=1e-5, atol=1e-6)


def test_cuda_graphs_without_cuda_fall_back_to_eager_steps_with_a_message(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        trainer = Trainer(tiny_config(tmp_path, "train.val_every=0", "train.device=cpu", "train.cuda_graphs=true"))
    assert trainer.graph_steps is None
    assert "train.cuda_graphs is on, but train.device resolves to cpu" in caplog.text


def test_a_failed_capture_falls_back_to_eager_steps_with_a_message(tmp_path, monkeypatch, caplog):
    """Where capturing raises (here: made to, on the CPU), the step runs eagerly and so do the later ones."""
    trainer = Trainer(tiny_config(tmp_path / "a", "train.val_every=0"))
    eager = Trainer(tiny_config(tmp_path / "b", "train.val_every=0"))
    data = run_batches(trainer, 2)
    trainer.graph_steps = CudaGraphSteps(trainer, BucketSet.from_totals([batch_totals(b) for b in data]))

    def refuse(self, static):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(CudaGraphSteps, "_capture", refuse)
    with caplog.at_level("WARNING"):
        got = trainer.train_step(data[0])
    assert "capturing the training step failed (operation not permitted" in caplog.text
    assert trainer.graph_steps is None
    assert torch.equal(got, eager.train_step(data[0]))
    assert torch.equal(trainer.train_step(data[1]), eager.train_step(data[1]))


def test_a_forced_skip_leaves_weights_optimizer_and_schedule_unchanged(tmp_path):
    """What the graph warm-up relies on: ``step_body(batch, skip=1)`` runs the whole step and changes nothing (the
    optimizer state it creates on a first step is the state a first real step starts from)."""
    trainer = Trainer(tiny_config(tmp_path, "train.val_every=0"))
    first, second = run_batches(trainer, 2)
    twin = Trainer(tiny_config(tmp_path / "twin", "train.val_every=0"))
    metrics = trainer.step_body(first, skip=torch.ones(()))
    assert metrics[-2] == 1.0  # reported as skipped
    assert_same_state(clone_state(twin), {**clone_state(trainer), "optimizer": twin.optimizer.state_dict()})
    for t in (trainer, twin):
        t.train_step(first)
    assert_same_state(clone_state(twin), clone_state(trainer))
    before = clone_state(trainer)
    trainer.step_body(second, skip=torch.ones(()))
    assert_same_state(before, clone_state(trainer))


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_cuda_graphs_replay_across_lengths_as_the_eager_step_computes(tmp_path, amp):
    """Six batches of different lengths: captured once per bucket, replayed after; metrics and weights agree with
    eager steps on the same batches (fp32: to rounding; bf16 autocast, whose cast cache a graph must not keep:
    loosely, as bf16 sums over padded rows round differently)."""
    options = ["train.val_every=0", "train.device=cuda", f"train.amp={amp}", "data.synthetic.missing_frames=0.3"]
    eager = Trainer(tiny_config(tmp_path / "eager", *options))
    graphed = Trainer(tiny_config(tmp_path / "graphs", *options, "train.cuda_graphs=true"))
    assert graphed.graph_steps is not None, "the trainer fell back to eager steps"
    data = run_batches(eager, 6)
    assert len({b.num_tokens for b in data}) > 1
    close = {"rtol": 2e-4, "atol": 1e-6} if amp == "none" else {"rtol": 3e-2, "atol": 1e-3}
    for batch in data:
        batch = batch.to(eager.device)
        torch.testing.assert_close(graphed.train_step(batch), eager.train_step(batch), **close)
    steps = graphed.graph_steps
    assert 1 <= len(steps.graphs) <= len(steps.buckets.buckets) and steps.replays == 6
    if amp == "none":
        assert_same_weights(eager, graphed, steps=6, rtol=1e-3, atol=1e-4)
    else:  # bf16 rounding differences become AdamW steps of up to lr
        assert_same_weights(eager, graphed, steps=6, rtol=0, atol=6 * graphed.config.train.lr)
    state = copy.deepcopy(graphed.optimizer.state_dict()["state"])
    assert all(int(s["step"]) == 6 for s in state.values())
