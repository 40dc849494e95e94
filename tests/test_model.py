"""The multimodal CrossMAE: the packed path agrees with the seed's path, and every option runs."""

import pytest
import torch
from model_cases import PATCH, SPEC, STEPS, collate, random_samples, small_model_config

from crossmae.model import MultimodalCrossMAE

OPTIONS = [
    {},
    {"use_cross_attn": False},
    {"decoder_self_attn": True},
    {"use_weighted_fm": True, "use_fm_layers": [0, -1], "use_input": True},
    {"memory": "own"},
    {"norm_pix_loss": True, "loss_weights": {"flow": 2.0}},
]


def build(cfg, fused=True, seed=0):
    torch.manual_seed(seed)
    return MultimodalCrossMAE(SPEC, cfg, patch_size=PATCH, steps=STEPS, fused=fused)


def losses_and_grads(model, batch):
    model.zero_grad()
    out = model(batch)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.losses.items()}, grads


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_packed_path_matches_seed_path(options):
    """Same weights, same batch: per-modality losses and gradients agree (fp32, relative 1e-5)."""
    cfg = small_model_config(**options, attn_backend="sdpa_padded")
    batch = collate(random_samples(5), memory=cfg.memory, standard_decoder=not cfg.use_cross_attn)
    fused = build(cfg, fused=True)
    seed = build(cfg, fused=False)
    seed.load_state_dict(fused.state_dict())
    assert (fused.encoder_path, fused.decoder_path) == ("packed", "packed")
    assert (seed.encoder_path, seed.decoder_path) == ("padded", "loop")
    losses_f, grads_f = losses_and_grads(fused, batch)
    losses_s, grads_s = losses_and_grads(seed, batch)
    for name in losses_f:
        assert torch.isfinite(losses_f[name])
        rel = (losses_f[name] - losses_s[name]).abs() / losses_s[name].abs().clamp_min(1e-12)
        assert rel < 1e-5, f"{name} loss differs: {losses_f[name]} vs {losses_s[name]}"
    assert grads_f.keys() == grads_s.keys()
    for key, g in grads_f.items():
        rel = (g - grads_s[key]).abs().max() / grads_s[key].abs().max().clamp_min(1e-12)
        assert rel < 1e-5, f"gradient of {key} differs (relative {rel:.2e})"


def test_padded_decoder_path_matches_packed():
    cfg = small_model_config(decoder_self_attn=True, attn_backend="math")
    batch = collate(random_samples(4))
    model = build(cfg)
    packed = model(batch).losses
    model.set_paths(decoder="padded")
    padded = model(batch).losses
    for name in packed:
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-5, atol=1e-6)


def test_output_structure_and_gradients_reach_every_modality():
    cfg = small_model_config()
    batch = collate(random_samples(3))
    model = build(cfg)
    out = model(batch)
    assert set(out.losses) == set(out.predictions) == {m.name for m in SPEC.modalities}
    for name, pred in out.predictions.items():
        mb = batch.modalities[name]
        assert pred.shape == mb.target.shape and torch.isfinite(pred).all()
    out.loss.backward()
    for name in out.losses:
        assert model.decoders[name].head.weight.grad.abs().sum() > 0
        assert model.embed[name].weight.grad.abs().sum() > 0


def test_normalizers_divide_the_sum_of_squares():
    batch = collate(random_samples(3))
    model = build(small_model_config())
    out = model(batch, normalizers={n: 10.0 for n in batch.modalities})
    for name in out.losses:
        torch.testing.assert_close(out.losses[name], out.sse[name] / 10.0)


def test_bad_paths_and_options_are_rejected():
    model = build(small_model_config())
    with pytest.raises(ValueError, match="decoder path must be one of"):
        model.set_paths(decoder="fast")
    with pytest.raises(ValueError, match="use_weighted_fm needs"):
        build(small_model_config(use_weighted_fm=True, use_cross_attn=False))
