"""``model.interp_prior``: the decoder of a series predicts a correction to the linear interpolation between the
sample's nearest visible tokens; with its head at zero the model's predictions are that interpolation."""

import numpy as np
import pytest
import torch
from model_cases import PATCH, SPEC, STEPS, collator_for, random_samples, small_model_config
from test_model import assert_packed_matches_seed_path

from crossmae.config import ConfigError, MaskConfig, resolve_config
from crossmae.engine import HostSyncCounter
from crossmae.model import MultimodalCrossMAE, interpolation_prior

SPAN_MASK = MaskConfig(grid_ratio=0.6, series_ratio=0.6, mode="span", span_days=[1, 3])


def build(cfg) -> MultimodalCrossMAE:
    torch.manual_seed(0)
    return MultimodalCrossMAE(SPEC, cfg, patch_size=PATCH, steps=STEPS)


def reference_interpolation(queries: np.ndarray, visible: np.ndarray, values: np.ndarray, batch_size: int):
    """Per sample, ``np.interp`` of every value column at the query days (its ends hold the edge values), 0
    for a sample without a visible token."""
    out = np.zeros((len(queries), values.shape[1]))
    for b in range(batch_size):
        q, v = queries[:, 0] == b, visible[:, 0] == b
        if v.any():
            for f in range(values.shape[1]):
                out[q, f] = np.interp(queries[q, 1], visible[v, 1], values[v, f])
    return out


def index(rows):
    return torch.tensor([(b, t, 0) for b, t in rows], dtype=torch.long).reshape(-1, 3)  # [n, 3]


def test_the_prior_interpolates_between_neighbours_and_holds_the_edges():
    visible = index([(0, 2), (0, 5), (2, 0), (3, 1), (3, 3), (3, 4)])
    values = torch.tensor([[1.0, -1.0], [4.0, 2.0], [7.0, 0.5], [0.0, 0.0], [2.0, 4.0], [-3.0, 1.0]])
    # sample 0: a gap at the start, in the middle, at the end; 1: no visible token; 2: only one before; 3: a
    # one-day gap between neighbours two days apart
    queries = index([(0, 0), (0, 1), (0, 3), (0, 4), (0, 7), (1, 0), (1, 3), (2, 1), (2, 5), (3, 2), (3, 0)])
    got = interpolation_prior(queries, visible, values, steps=8)
    want = torch.tensor([[1.0, -1.0], [1.0, -1.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [0.0, 0.0], [0.0, 0.0],
                         [7.0, 0.5], [7.0, 0.5], [1.0, 2.0], [0.0, 0.0]])
    torch.testing.assert_close(got, want)
    ref = reference_interpolation(queries.numpy(), visible.numpy(), values.numpy(), batch_size=4)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-6)


def test_no_visible_token_in_the_batch_gives_zero():
    got = interpolation_prior(index([(0, 1), (1, 2)]), index([]), torch.zeros(0, 3), steps=4)
    assert torch.equal(got, torch.zeros(2, 3))


def zero_head_case():
    cfg = small_model_config(interp_prior=["flow", "evap"])
    batch = collator_for(cfg, SPAN_MASK)(random_samples(6, seed=3))
    return cfg, batch, build(cfg)


def test_an_untrained_model_predicts_the_interpolation_of_a_ragged_batch():
    cfg, batch, model = zero_head_case()
    for name in ("flow", "evap"):
        assert torch.equal(model.decoders[name].head.weight, torch.zeros_like(model.decoders[name].head.weight))
    with torch.no_grad():
        out = model(batch)
    covered = set()
    for name in ("flow", "evap"):
        mb = batch.modalities[name]
        q, v = mb.queries.index.numpy(), mb.encoder.index.numpy()
        ref = reference_interpolation(q, v, mb.encoder.values.double().numpy(), batch.batch_size)
        np.testing.assert_allclose(out.predictions[name].double().numpy(), ref, rtol=1e-5, atol=1e-6,
                                   err_msg=name)
        for b in range(batch.batch_size):
            days, seen = q[q[:, 0] == b, 1], v[v[:, 0] == b, 1]
            if len(days) and len(seen):
                covered |= {"start"} if days.min() < seen.min() else set()
                covered |= {"end"} if days.max() > seen.max() else set()
                covered |= {"middle"} if ((days > seen.min()) & (days < seen.max())).any() else set()
    assert covered == {"start", "end", "middle"}, covered
    plain = build(small_model_config())
    with torch.no_grad():
        assert not torch.allclose(plain(batch).predictions["flow"], out.predictions["flow"])


def test_gradients_are_finite_and_reach_the_head():
    _, batch, model = zero_head_case()
    model(batch).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    assert model.decoders["flow"].head.weight.grad.abs().sum() > 0


def test_a_forward_makes_no_host_sync():
    _, batch, model = zero_head_case()
    model(batch)  # the batch's settings are checked once, here
    with HostSyncCounter() as counter:
        model(batch).loss.backward()
    assert counter.ops > 50
    assert counter.syncs == 0 and counter.reads == 0, counter.names


def test_grid_modalities_are_refused_and_absent_names_ignored():
    with pytest.raises(ConfigError, match=r"model\.interp_prior.*precip"):
        build(small_model_config(interp_prior=["precip"]))
    with pytest.raises(ConfigError, match=r"model\.interp_prior.*precip"):
        resolve_config(None, None, ["model.interp_prior=[streamflow, precip]"])
    with pytest.warns(UserWarning, match=r"model\.interp_prior.*discharge"):
        model = build(small_model_config(interp_prior=["flow", "discharge"]))
    assert model.interp_names == ("flow",)


@pytest.mark.parametrize("options", [{}, {"use_cross_attn": False}, {"loss_reduction": "samples"}])
def test_the_packed_path_matches_the_seed_path(options):
    cfg = small_model_config(interp_prior=["flow", "evap"], **options)
    assert_packed_matches_seed_path(cfg, (SPEC, STEPS, PATCH, collator_for(cfg, SPAN_MASK)(random_samples(6, seed=3))))
