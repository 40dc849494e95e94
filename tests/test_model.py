"""The multimodal CrossMAE: the packed path agrees with the seed's path for every option and backend, samples
never leak into each other, and the parts with a rule (FiLM, block order, static flags, loss reduction) match
small hand computations."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from model_cases import (
    PATCH,
    SPEC,
    STEPS,
    collate,
    collator_for,
    random_samples,
    small_model_config,
)

from crossmae.config import MaskConfig
from crossmae.data.sample import DatasetSpec, ModalitySpec, Sample
from crossmae.layers import CrossAttentionBlock, FiLM, PackedLayout, PaddedLayout
from crossmae.model import MultimodalCrossMAE
from crossmae.packed import Packed

OPTIONS = [
    {},
    {"use_cross_attn": False},
    {"decoder_self_attn": True},
    {"use_weighted_fm": True, "use_fm_layers": [0, -1], "use_input": True},
    {"memory": "own"},
    {"memory": "own", "use_cross_attn": False},
    {"norm_pix_loss": True, "norm_pix_modalities": ["precip"], "loss_weights": {"flow": 2.0}},
    {"fusion_depth": 1},
    {"fusion_depth": 2, "use_weighted_fm": True, "use_input": True, "memory": "own"},
    {"static": "film"},
    {"static": "both", "static_on": "series"},
    {"day_of_year": True, "learned_space": True},
    {"loss_reduction": "samples"},
    {"memory_drop": ["precip"], "fusion_depth": 1, "use_weighted_fm": True},
]
EVERYTHING = {"fusion_depth": 1, "static": "both", "decoder_self_attn": True, "use_weighted_fm": True,
              "use_input": True, "day_of_year": True, "learned_space": True, "loss_reduction": "samples"}
MASKS = {
    "free": MaskConfig(grid_ratio=0.6, series_ratio=0.5),
    "unified": MaskConfig(grid_ratio=0.6, series_ratio=0.5, mode="unified"),
    "frame-kept": MaskConfig(grid_ratio=0.6, series_ratio=0.5, mode="frame", kept_mask_ratio=0.3),
}


def option_id(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "default"


# -- a batch whose segments are 0, 1 and 97 tokens long -----------------------------------------------------------
LENGTH_STEPS = 100
LENGTH_SPEC = DatasetSpec(
    modalities=(ModalitySpec("precip", "grid", channels=1, height=4, width=4), ModalitySpec("flow", "series", 1)),
    static_dim=2,
)
LENGTH_MASK = MaskConfig(grid_ratio=0.97, series_ratio=0.03)


def length_samples() -> list[Sample]:
    """Sample 0 has no valid token, sample 1 one per modality, sample 2 a full record: with LENGTH_MASK the
    precip queries are 0, 1, 97 long and the flow encoder sequences 0, 1, 97 (+ a static token)."""
    gen = torch.Generator().manual_seed(5)
    samples = []
    for i, valid_days in enumerate([0, 1, LENGTH_STEPS]):
        grid = torch.randn(LENGTH_STEPS, 1, 4, 4, generator=gen)
        flow = torch.randn(LENGTH_STEPS, 1, generator=gen)
        grid[valid_days:] = float("nan")
        flow[:] = torch.where(torch.arange(LENGTH_STEPS)[:, None] == 5, flow, float("nan")) if valid_days == 1 \
            else torch.where(torch.arange(LENGTH_STEPS)[:, None] < valid_days, flow, float("nan"))
        static = torch.randn(2, generator=gen)
        static[0] = float("nan") if i == 1 else static[0]
        samples.append(Sample(grids={"precip": grid}, basin_masks={"precip": torch.ones(4, 4, dtype=torch.bool)},
                              series={"flow": flow}, static=static, noise_seed=7 + i, first_day=400 * i))
    return samples


def length_case(cfg, mask: MaskConfig = LENGTH_MASK):
    batch = collator_for(cfg, mask, spec=LENGTH_SPEC, steps=LENGTH_STEPS, patch=4)(length_samples())
    assert batch.modalities["precip"].queries.packed.lengths.tolist() == [0, 1, 97]
    assert batch.modalities["flow"].encoder.visible.lengths.tolist() == [0, 1, 97]
    return LENGTH_SPEC, LENGTH_STEPS, 4, batch


def random_case(cfg, mask: MaskConfig = MASKS["free"]):
    return SPEC, STEPS, PATCH, collator_for(cfg, mask)(random_samples(5))


def build(cfg, spec=SPEC, steps=STEPS, patch=PATCH, fused=True, seed=0):
    torch.manual_seed(seed)
    return MultimodalCrossMAE(spec, cfg, patch_size=patch, steps=steps, fused=fused)


def loss_and_grads(model, batch):
    model.zero_grad()
    out = model(batch)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def assert_packed_matches_seed_path(cfg, case, rtol=1e-5):
    """Same weights, same batch: the packed model's loss and every gradient agree with the seed's path."""
    spec, steps, patch, batch = case
    fused = build(cfg, spec, steps, patch, fused=True)
    seed = build(cfg, spec, steps, patch, fused=False)
    seed.load_state_dict(fused.state_dict())
    assert (fused.encoder_path, fused.decoder_path) == ("packed", "packed")
    assert (seed.encoder_path, seed.decoder_path) == ("padded", "loop")
    loss_f, grads_f = loss_and_grads(fused, batch)
    loss_s, grads_s = loss_and_grads(seed, batch)
    assert torch.isfinite(loss_f)
    assert (loss_f - loss_s).abs() <= rtol * loss_s.abs(), f"loss differs: {loss_f} vs {loss_s}"
    assert grads_f.keys() == grads_s.keys()
    trained = {k for k, p in fused.named_parameters() if p.requires_grad}
    assert len(grads_f) > 0.8 * len(trained)
    for key, g in grads_f.items():
        rel = (g - grads_s[key]).abs().max() / grads_s[key].abs().max().clamp_min(1e-12)
        assert rel < rtol, f"gradient of {key} differs (relative {rel:.2e})"


@pytest.mark.parametrize("backend", ["sdpa_padded", "cpu"])
@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
def test_packed_path_matches_seed_path(options, backend):
    cfg = small_model_config(**options, attn_backend=backend)
    rtol = 1e-5 if backend == "sdpa_padded" else 1e-4  # the cpu kernel sums in its own order (fp32)
    assert_packed_matches_seed_path(cfg, random_case(cfg), rtol)
    assert_packed_matches_seed_path(cfg, length_case(cfg), rtol)


@pytest.mark.parametrize("mask", ["unified", "frame-kept"])
def test_packed_path_matches_seed_path_with_mask_modes(mask):
    cfg = small_model_config(**EVERYTHING, attn_backend="cpu")
    assert_packed_matches_seed_path(cfg, random_case(cfg, MASKS[mask]), rtol=1e-4)


@pytest.mark.parametrize("options", [{}, EVERYTHING, {"use_cross_attn": False, "memory": "own"},
                                     {"static": "film", "memory_drop": ["flow"], "norm_pix_loss": True,
                                      "norm_pix_modalities": ["precip"]}], ids=option_id)
def test_packed_path_matches_seed_path_on_the_triton_backend(options):
    from crossmae_kernels.varlen_attention import is_interpreting

    if not (is_interpreting() or torch.cuda.is_available()):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    cfg = small_model_config(**options, attn_backend="triton")
    cfg.enc_depth = cfg.dec_depth = 1
    assert_packed_matches_seed_path(cfg, length_case(cfg), rtol=1e-4)


@pytest.mark.parametrize("options", [*OPTIONS, EVERYTHING], ids=option_id)
def test_no_sample_sees_another(options):
    """Perturb every value of one sample (same validity, so the same masks): every other sample's predictions
    stay bit-identical, and the perturbed sample's change."""
    cfg = small_model_config(**options, attn_backend="cpu")
    samples = random_samples(4)
    changed = copy.deepcopy(samples)
    victim = 2
    for values in [*changed[victim].grids.values(), *changed[victim].series.values(), changed[victim].static]:
        values.add_(1.5)  # NaN stays NaN
    collator = collator_for(cfg, MASKS["unified"])
    model = build(cfg).eval()
    with torch.no_grad():
        before, after = model(collator(samples)), model(collator(changed))
    batch = collator(samples)
    moved = False
    for name, pred in before.predictions.items():
        sample = batch.modalities[name].queries.index[:, 0]
        others = sample != victim
        assert torch.equal(pred[others], after.predictions[name][others]), f"{name}: another sample changed"
        moved = moved or not torch.equal(pred[~others], after.predictions[name][~others])
    assert moved, "the perturbed sample's predictions did not change"


def test_a_dropped_modality_reaches_no_prediction():
    cfg = small_model_config(memory_drop=["temp"], fusion_depth=1, static="both")
    samples = random_samples(3)
    changed = copy.deepcopy(samples)
    for s in changed:
        s.grids["temp"].add_(3.0)
    collator = collator_for(cfg)
    model = build(cfg).eval()
    assert "temp" not in model.encoders and "temp" in model.decoders
    with torch.no_grad():
        before, after = model(collator(samples)), model(collator(changed))
    for name, pred in before.predictions.items():
        assert torch.equal(pred, after.predictions[name]), name
    assert collator(samples).memory.packed.total == sum(
        mb.encoder.seq.total for n, mb in collator(samples).modalities.items() if n != "temp")
    with pytest.raises(ValueError, match="memory modalities"):
        build(cfg)(collator_for(small_model_config())(samples))
    with pytest.raises(ValueError, match="model.memory_drop must name some, not all"):
        build(small_model_config(memory_drop=["rain"]))


def test_output_structure_and_gradients_reach_every_modality():
    cfg = small_model_config(fusion_depth=1, static="both")
    batch = collator_for(cfg)(random_samples(3))
    model = build(cfg)
    out = model(batch)
    assert set(out.losses) == set(out.predictions) == set(out.sums) == set(out.counts) == set(model.names)
    for name, pred in out.predictions.items():
        mb = batch.modalities[name]
        assert pred.shape == mb.targets.values.shape and torch.isfinite(pred).all()
        assert out.counts[name] == mb.targets.weight.sum()
    out.loss.backward()
    for name in out.losses:
        assert model.decoders[name].head.weight.grad.abs().sum() > 0
        assert model.embed[name].weight.grad.abs().sum() > 0
        assert model.fusion_tokens[name].grad.abs().sum() > 0
    assert model.film["flow"][0].proj.weight.grad.abs().sum() > 0


def test_normalizers_divide_the_sums():
    batch = collate(random_samples(3))
    model = build(small_model_config())
    out = model(batch, normalizers={n: 10.0 for n in batch.modalities})
    for name in out.losses:
        torch.testing.assert_close(out.losses[name], out.sums[name] / 10.0)


def test_loss_reduction_samples_is_the_mean_of_per_sample_means():
    cfg = small_model_config(loss_reduction="samples", loss_weights={"precip": 100.0})
    batch = collator_for(cfg)(random_samples(4))
    model = build(cfg)
    out = model(batch)
    total = 0.0
    for name, pred in out.predictions.items():
        mb = batch.modalities[name]
        means = []
        for b in range(4):
            rows = mb.queries.index[:, 0] == b
            w = mb.targets.weight[rows]
            if w.sum() > 0:
                means.append((((pred[rows] - mb.targets.values[rows]) ** 2) * w).sum() / w.sum())
        expected = torch.stack(means).mean()
        torch.testing.assert_close(out.losses[name], expected)
        assert out.counts[name] == len(means)
        total = total + expected * (100.0 if name == "precip" else 1.0)
    torch.testing.assert_close(out.loss, total)


def test_norm_pix_uses_the_unbiased_variance_and_is_refused_for_single_value_tokens():
    cfg = small_model_config(norm_pix_loss=True, norm_pix_modalities=["evap"])
    model = build(cfg)
    values = torch.tensor([[1.0, 3.0]])
    weight = torch.ones(1, 2)
    # mean 2, unbiased variance ((1-2)² + (3-2)²) / (2 - 1) = 2
    expected = torch.tensor([[-1.0, 1.0]]) / math.sqrt(2.0 + 1e-6)
    torch.testing.assert_close(model.normalized_targets("evap", values, weight), expected)
    assert torch.equal(model.normalized_targets("flow", values, weight), values)
    with pytest.raises(ValueError, match=r"tokens of \['flow'\] hold one value"):
        build(small_model_config(norm_pix_loss=True))
    with pytest.raises(ValueError, match="norm_pix_modalities names"):
        build(small_model_config(norm_pix_loss=True, norm_pix_modalities=["rain"]))


def test_film_scales_and_shifts_each_sample_by_its_condition():
    film = FiLM(cond_dim=1, dim=2)
    with torch.no_grad():
        film.proj.weight.copy_(torch.tensor([[1.0], [0.0], [0.0], [2.0]]))  # γ = (c, 0), β = (0, 2c)
        film.proj.bias.copy_(torch.tensor([0.0, 0.5, 1.0, 0.0]))  # γ += (0, 0.5), β += (1, 0)
    cond = torch.tensor([[2.0], [-1.0]])  # sample 0: γ = (2, 0.5), β = (1, 4); sample 1: γ = (-1, 0.5), β = (1, -2)
    x = torch.tensor([[1.0, 1.0], [2.0, -2.0], [3.0, 4.0]])  # rows 0, 1 of sample 0, row 2 of sample 1
    packed = Packed.from_lengths([2, 1])
    expected = torch.tensor([[1 * 3 + 1, 1 * 1.5 + 4], [2 * 3 + 1, -2 * 1.5 + 4], [3 * 0 + 1, 4 * 1.5 - 2]])
    torch.testing.assert_close(film(x, cond, PackedLayout(packed, packed)), expected)
    padded = PaddedLayout(packed, packed)
    torch.testing.assert_close(padded.leave(film(padded.enter(x), cond, padded)), expected)
    assert torch.equal(FiLM(3, 4)(x[:, :1].expand(3, 4), torch.ones(2, 3), PackedLayout(packed, packed)),
                       x[:, :1].expand(3, 4))  # zero-initialised: the identity


def test_decoder_block_runs_self_attention_then_cross_attention_then_the_mlp():
    torch.manual_seed(0)
    block = CrossAttentionBlock(dim=4, heads=1, mlp_ratio=1.0, self_attn=True)
    x, memory = torch.randn(3, 4), torch.randn(5, 4)
    q, k = Packed.from_lengths([3]), Packed.from_lengths([5])

    def attend(queries, keys, values):
        return torch.softmax(queries @ keys.T / 2.0, dim=-1) @ values  # one head of width 4: scale 1/√4

    sa = block.self_attn
    h = block.norm_s(x)
    qkv = sa.qkv(h)
    x1 = x + sa.proj(attend(qkv[:, :4], qkv[:, 4:8], qkv[:, 8:]))
    kv = block.cross.kv(memory)
    x2 = x1 + block.cross.proj(attend(block.cross.q(block.norm_q(x1)), kv[:, :4], kv[:, 4:]))
    expected = x2 + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(x2))))
    out = block(x, memory, PackedLayout(q, k, "math"), PackedLayout(q, q, "math"))
    torch.testing.assert_close(out, expected)


def test_a_missing_static_attribute_is_flagged_not_zero():
    cfg = small_model_config()
    collator = collator_for(cfg)
    samples = random_samples(2)
    samples[0].static[1] = float("nan")
    samples[1].static[1] = 0.0
    batch = collator(samples)
    assert batch.static.missing[:, 1].tolist() == [True, False]
    assert batch.static.values[0, 1] == 0.0
    model = build(cfg)
    embedded = model._static_embedding(batch)  # [B, enc_dim]
    flag = model.static_embed.weight[:, SPEC.static_dim + 1]  # the weight of attribute 1's missing flag
    without_flag = model.static_embed(torch.cat([batch.static.values, torch.zeros(2, SPEC.static_dim)], 1))
    torch.testing.assert_close(embedded[0] - without_flag[0], flag)
    assert torch.equal(embedded[1], without_flag[1])


def test_day_of_year_embedding_follows_the_calendar():
    cfg = small_model_config(day_of_year=True)
    samples = random_samples(2)
    samples[0].first_day, samples[1].first_day = 0, 365 + 31  # 1970-01-01 and 1971-02-01
    batch = collator_for(cfg)(samples)
    assert batch.day_of_year[0].tolist() == list(range(STEPS))
    assert batch.day_of_year[1].tolist() == [31.0 + t for t in range(STEPS)]
    samples[0].first_day = None
    with pytest.raises(ValueError, match="model.day_of_year needs each sample's first_day"):
        collator_for(cfg)(samples)


def test_dropout_is_active_in_training_only():
    cfg = small_model_config(dropout=0.5)
    batch = collator_for(cfg)(random_samples(2))
    model = build(cfg)
    with torch.no_grad():
        train_a, train_b = model(batch).loss, model(batch).loss
        model.eval()
        eval_a, eval_b = model(batch).loss, model(batch).loss
    assert train_a != train_b and eval_a == eval_b


def test_the_model_checks_its_collator():
    model = build(small_model_config(static="film"))
    with pytest.raises(ValueError, match=r"static tokens for \['precip', 'temp', 'flow', 'evap'\]"):
        model(collate(random_samples(2)))
    model = build(small_model_config(use_cross_attn=False))
    with pytest.raises(ValueError, match="no standard decoder sequences"):
        model(collate(random_samples(2)))
    model = build(small_model_config(), patch=3)
    with pytest.raises(ValueError, match="patch_size 4 \\(the model's is 3\\)"):
        model(collate(random_samples(2)))


def test_bad_paths_and_options_are_rejected():
    model = build(small_model_config())
    with pytest.raises(ValueError, match="decoder path must be one of"):
        model.set_paths(decoder="fast")
    with pytest.raises(ValueError, match="use_weighted_fm needs"):
        build(small_model_config(use_weighted_fm=True, use_cross_attn=False))
    with pytest.raises(ValueError, match="model.static must be one of"):
        build(small_model_config(static="film_and_token"))


def test_the_packed_backend_is_resolved_once_per_stage(monkeypatch):
    import crossmae.model as model_module
    from crossmae.ops import AttentionBackend

    calls = []
    real = model_module.resolve_backend

    def counting(*args, **kwargs):
        calls.append(kwargs["head_dim"])
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "resolve_backend", counting)
    cfg = small_model_config(attn_backend="cpu", decoder_self_attn=True, fusion_depth=1)
    model = build(cfg)
    layouts = []
    real_make = model_module.make_layout
    monkeypatch.setattr(model_module, "make_layout", lambda *a: layouts.append(real_make(*a)) or layouts[-1])
    model(collator_for(cfg)(random_samples(2)))
    # 4 encoders + the fusion stage + 4 decoders x (cross, self): 13 resolutions for 4·2 + 1 + 4·2·2 = 25 attentions
    assert len(calls) == 13 and all(isinstance(layout.backend, AttentionBackend) for layout in layouts)
    assert {lay.backend.name for lay in layouts} == {"cpu"}
