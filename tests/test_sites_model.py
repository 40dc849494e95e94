"""Site sets on the model side: tokens, masks, the model's site embeddings, per-site scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from model_cases import small_model_config

from crossmae.config import MaskConfig
from crossmae.data.collate import MaskingCollator
from crossmae.data.sample import DatasetSpec, ModalitySpec, Sample
from crossmae.data.sites import build_layout, group_values, ungroup_values
from crossmae.evaluate import _flow_scores, collect_site_days, site_nse_map, site_tokens_to_values, write_site_csv
from crossmae.layers import grid_sincos_embedding, point_sincos_embedding, site_patch_positions
from crossmae.model import MultimodalCrossMAE, site_conditioning, static_conditioning

STEPS = 8
PATCH = 5
GAUGES = ModalitySpec("gauges", "sites", channels=2, groups=3, group_size=2,
                      locations=((2.5, 2.5), (7.0, 3.0), (4.0, 9.5)), site_attrs=3)
WELLS = ModalitySpec("wells", "sites", channels=1, groups=2, group_size=3, locations=((1.0, 1.0), (8.0, 8.0)))
SPEC = DatasetSpec(modalities=(
    ModalitySpec("precip", "grid", channels=1, height=10, width=12),
    ModalitySpec("flow", "series", channels=1),
    GAUGES,
    WELLS,
), grid_shape=(10, 12))


def site_samples(n: int, seed: int = 0, spec: DatasetSpec = SPEC) -> list[Sample]:
    """Random samples: gauge group 2's second slot is empty, gauge group 1 has no value on day 3, some gaps."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        s = Sample(noise_seed=seed * 100 + i, first_day=12_000 + 40 * i, meta={"start_day": 12_000 + 40 * i})
        for m in spec.grids:
            s.grids[m.name] = torch.randn(STEPS, m.channels, m.height, m.width, generator=gen)
            s.basin_masks[m.name] = torch.rand(m.height, m.width, generator=gen) < 0.6
        for m in spec.series:
            values = torch.randn(STEPS, m.channels, generator=gen)
            values[torch.rand(STEPS, generator=gen) < 0.2] = float("nan")
            s.series[m.name] = values
        for m in spec.sites:
            values = torch.randn(STEPS, m.groups, m.group_size, m.channels, generator=gen)
            values[torch.rand(values.shape, generator=gen) < 0.15] = float("nan")
            slots = torch.ones(m.groups, m.group_size, dtype=torch.bool)
            if m.name == "gauges":
                slots[2, 1] = False
                values[:, 2, 1] = float("nan")
                values[3, 1] = float("nan")  # group 1 has no value on day 3
            s.sites[m.name], s.site_masks[m.name] = values, slots
            if m.site_attrs:
                attrs = torch.randn(m.groups, m.group_size, m.site_attrs, generator=gen)
                attrs[0, 0, 1] = float("nan")
                attrs[~slots] = float("nan")
                s.site_static[m.name] = attrs
        samples.append(s)
    return samples


def collator(cfg=None, mask: MaskConfig | None = None, spec: DatasetSpec = SPEC) -> MaskingCollator:
    cfg = cfg or small_model_config()
    static_tokens, _ = static_conditioning(spec, cfg)
    return MaskingCollator(spec, mask or MaskConfig(grid_ratio=0.6, series_ratio=0.5), PATCH, STEPS,
                           memory=cfg.memory, standard_decoder=not cfg.use_cross_attn, static_tokens=static_tokens)


def tokens_by_position(index: torch.Tensor, values: torch.Tensor, b: int, g: int, width: int) -> torch.Tensor:
    """``[B, T, G, width]`` holding ``values`` at ``index`` (b, t, g); NaN elsewhere."""
    out = torch.full((b, STEPS, g, width), float("nan"))
    out[index[:, 0], index[:, 1], index[:, 2]] = values
    return out


def test_site_tokens_round_trip_to_per_site_values():
    samples = site_samples(3)
    batch = collator()(samples)
    m = GAUGES
    mb = batch.modalities["gauges"]
    width = m.group_size * m.channels
    assert mb.patch_grid == (1, m.groups)
    assert mb.encoder.values.shape[1] == width and mb.targets.values.shape[1] == width
    truth = torch.stack([s.sites["gauges"] for s in samples])  # [B, T, G, K, F]
    slots = torch.stack([s.site_masks["gauges"] for s in samples])
    counts = torch.isfinite(truth) & slots[:, None, :, :, None]
    # visible tokens from the encoder, hidden ones from the targets: together every valid token, exactly once
    seen = torch.cat([mb.encoder.index, mb.queries.index])
    assert len({tuple(r) for r in seen.tolist()}) == len(seen)
    assert len(seen) == int(counts.flatten(3).any(-1).sum())
    enc = tokens_by_position(mb.encoder.index, mb.encoder.values, 3, m.groups, width)
    tgt, predicted = site_tokens_to_values(mb.targets.values, mb.queries.index, 3, STEPS, m.groups, m.group_size,
                                           m.channels)
    weight, _ = site_tokens_to_values(mb.targets.weight, mb.queries.index, 3, STEPS, m.groups, m.group_size,
                                      m.channels)
    together = torch.where(predicted[..., None, None], tgt, enc.view_as(tgt))  # [B, T, G, K, F]
    assert torch.equal(together[counts], truth[counts])  # every counted value lands back at its site and day
    assert torch.equal((weight == 1)[predicted], counts[predicted])  # the loss counts exactly the counted values
    assert not torch.isnan(mb.targets.values).any() and not torch.isnan(mb.encoder.values).any()
    # per-site values through a layout's flat order
    flat = torch.nonzero(slots[0].flatten()).flatten()  # [S]
    per_site = together.flatten(2, 3)[:, :, flat]  # [B, T, S, F]
    expected = truth.flatten(2, 3)[:, :, flat]
    ok = torch.isfinite(expected)
    assert torch.equal(per_site[ok], expected[ok])


def test_layout_grouping_tokens_predictions_and_per_site_values_round_trip():
    # 7 sites in k-means groups of 3 (one group with an empty slot); site 4 has no data at all in the window
    gen = torch.Generator().manual_seed(5)
    ids = [f"s{i}" for i in range(7)]
    rows = np.array([1.0, 1.5, 2.0, 8.0, 8.5, 9.0, 5.0])
    cols = np.array([1.0, 2.0, 1.5, 9.0, 8.0, 9.5, 5.0])
    layout = build_layout(ids, rows, cols, "kmeans", group_size=3)
    m = ModalitySpec("gauges", "sites", channels=2, groups=layout.groups, group_size=layout.group_size,
                     locations=layout.locations())
    spec = DatasetSpec(modalities=(m,), grid_shape=(10, 12))
    per_site = torch.randn(2, STEPS, 7, 2, generator=gen)  # [B, T, S, F]
    per_site[torch.rand(per_site.shape, generator=gen) < 0.2] = float("nan")
    silent = layout.site_ids.index("s4")
    per_site[:, :, silent] = float("nan")
    samples = [Sample(noise_seed=i, sites={"gauges": group_values(per_site[i], layout)},
                      site_masks={"gauges": torch.from_numpy(layout.slot_mask)}) for i in range(2)]
    batch = collator(spec=spec)(samples)
    mb = batch.modalities["gauges"]
    # the predictions of a model that predicts its targets exactly, with the encoder's visible values beside them
    hidden, predicted = site_tokens_to_values(mb.targets.values, mb.queries.index, 2, STEPS, m.groups, m.group_size,
                                              m.channels)  # [B, T, G, K, F]
    seen, _ = site_tokens_to_values(mb.encoder.values, mb.encoder.index, 2, STEPS, m.groups, m.group_size, m.channels)
    weight, _ = site_tokens_to_values(mb.targets.weight, mb.queries.index, 2, STEPS, m.groups, m.group_size,
                                      m.channels)
    vis_weight = torch.zeros_like(weight)
    vis_weight[mb.encoder.index[:, 0], mb.encoder.index[:, 1], mb.encoder.index[:, 2]] = 1.0
    counted = torch.where(predicted[..., None, None], weight, vis_weight * torch.isfinite(
        torch.stack([s.sites["gauges"] for s in samples])))  # [B, T, G, K, F]: 1 where a value counts
    rebuilt = torch.where(counted == 1, torch.where(predicted[..., None, None], hidden, seen), float("nan"))
    back = torch.stack([ungroup_values(rebuilt[i], layout) for i in range(2)])  # [B, T, S, F]
    assert torch.equal(torch.isfinite(back), torch.isfinite(per_site))
    assert torch.equal(back[torch.isfinite(back)], per_site[torch.isfinite(per_site)])
    # the silent site and the empty slot never count; a group whose sites are all silent on a day is no token
    g, k = next((g, k) for g in range(layout.groups) for k in range(layout.group_size) if layout.ids[g][k] == "s4")
    assert (counted[:, :, g, k] == 0).all()
    empty = ~torch.from_numpy(layout.slot_mask)
    assert (counted[:, :, empty] == 0).all()
    tokens = torch.cat([mb.encoder.index, mb.queries.index])
    any_value = torch.stack([torch.isfinite(s.sites["gauges"]).flatten(2).any(-1) for s in samples])  # [B, T, G]
    assert len(tokens) == int(any_value.sum())
    assert any_value[tokens[:, 0], tokens[:, 1], tokens[:, 2]].all()


def test_empty_slot_and_all_missing_group_day_are_never_tokens():
    batch = collator()(site_samples(2))
    mb = batch.modalities["gauges"]
    rows = torch.cat([mb.encoder.index, mb.queries.index, mb.hidden.index])
    assert not ((rows[:, 1] == 3) & (rows[:, 2] == 1)).any()  # group 1 on day 3: no value
    # the empty slot (group 2, slot 1) never counts in the loss, and is 0 in every token
    g2 = mb.queries.index[:, 2] == 2
    assert g2.any()
    empty = slice(1 * GAUGES.channels, 2 * GAUGES.channels)
    assert (mb.targets.weight[g2][:, empty] == 0).all()
    assert (mb.targets.values[g2][:, empty] == 0).all()
    enc_g2 = mb.encoder.index[:, 2] == 2
    assert (mb.encoder.values[enc_g2][:, empty] == 0).all()
    attrs = mb.site_attributes
    a = GAUGES.site_attrs
    assert attrs.values.shape == (2, 3, 2 * a) and attrs.occupied.shape == (2, 3, 2)
    assert attrs.missing[:, 2, a:].all() and not attrs.occupied[:, 2, 1].any()
    assert attrs.missing[:, 0, 1].all() and (attrs.values[:, 0, 1] == 0).all()


def test_a_site_set_with_a_wrong_shape_is_refused_naming_it():
    samples = site_samples(1)
    samples[0].site_masks["gauges"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="site set 'gauges'.*slots"):
        collator()(samples)


@pytest.mark.parametrize("mode", ["free", "frame", "span", "unified"])
def test_every_mask_mode_hides_part_of_each_site_set(mode):
    mask = MaskConfig(grid_ratio=0.6, series_ratio=0.5, mode=mode, span_days=[2, 3])
    batch = collator(mask=mask)(site_samples(4))
    for name in ("gauges", "wells"):
        mb = batch.modalities[name]
        vis, hid = mb.encoder.visible.lengths, mb.hidden.packed.lengths
        assert (vis > 0).all() and (hid > 0).all(), (mode, name, vis, hid)
        if mode == "frame":  # per day, half of the day's valid groups (rounded half up, at least 1 of 2+)
            valid = torch.zeros(4, STEPS, dtype=torch.long)
            hidden = torch.zeros(4, STEPS, dtype=torch.long)
            for idx, out in ((mb.encoder.index, valid), (mb.hidden.index, valid), (mb.hidden.index, hidden)):
                out.index_put_((idx[:, 0], idx[:, 1]), torch.ones(len(idx), dtype=torch.long), accumulate=True)
            want = torch.where(valid >= 2, torch.floor(0.5 * valid + 0.5).clamp(1).minimum(valid - 1),
                               torch.floor(0.5 * valid + 0.5))
            assert torch.equal(hidden, want.long())


def hidden_days(mb, batch_size: int) -> torch.Tensor:
    out = torch.zeros(batch_size, STEPS, dtype=torch.bool)
    out[mb.hidden.index[:, 0], mb.hidden.index[:, 1]] = True
    return out


def valid_days(mb, batch_size: int) -> torch.Tensor:
    out = hidden_days(mb, batch_size)
    out[mb.encoder.index[:, 0], mb.encoder.index[:, 1]] = True
    return out


@pytest.mark.parametrize("kept", [None, 0.3])
def test_unified_masks_hide_the_same_days_in_site_sets_and_series(kept):
    mask = MaskConfig(grid_ratio=0.6, series_ratio=0.5, mode="unified", kept_mask_ratio=kept)
    b = 5
    batch = collator(mask=mask)(site_samples(b, seed=3))
    day_sets = ("flow", "gauges", "wells")
    union_hidden = torch.stack([hidden_days(batch.modalities[n], b) for n in day_sets]).any(0)  # [B, T]
    assert union_hidden.any()
    for name in day_sets:
        mb = batch.modalities[name]
        # a day hidden anywhere is hidden here wherever it is valid, and a visible token's day is hidden nowhere
        assert torch.equal(hidden_days(mb, b), union_hidden & valid_days(mb, b)), name
        assert not union_hidden[mb.encoder.index[:, 0], mb.encoder.index[:, 1]].any(), name
    # half the union's valid days are hidden (rounded half up)
    union_valid = torch.stack([valid_days(batch.modalities[n], b) for n in day_sets]).any(0)
    n = union_valid.sum(1).double()
    assert torch.equal(union_hidden.sum(1), torch.floor(0.5 * n + 0.5).clamp(1).minimum(n - 1).long())
    # predicted tokens: whole days too
    pred_days = torch.zeros(b, STEPS, dtype=torch.bool)
    for name in day_sets:
        idx = batch.modalities[name].queries.index
        pred_days[idx[:, 0], idx[:, 1]] = True
    for name in day_sets:
        mb = batch.modalities[name]
        want = pred_days & valid_days(mb, b)
        got = torch.zeros(b, STEPS, dtype=torch.bool)
        got[mb.queries.index[:, 0], mb.queries.index[:, 1]] = True
        assert torch.equal(got, want), name
        hidden_per_day = torch.zeros(b, STEPS, dtype=torch.long)
        hidden_per_day.index_put_((mb.hidden.index[:, 0], mb.hidden.index[:, 1]),
                                  torch.ones(len(mb.hidden.index), dtype=torch.long), accumulate=True)
        valid_per_day = hidden_per_day.clone()
        valid_per_day.index_put_((mb.encoder.index[:, 0], mb.encoder.index[:, 1]),
                                 torch.ones(len(mb.encoder.index), dtype=torch.long), accumulate=True)
        hid = hidden_per_day > 0
        assert torch.equal(hidden_per_day[hid], valid_per_day[hid]), name  # a hidden day hides every group


def test_site_positions_use_the_grid_patch_frequencies():
    # a group centred in patch (1, 2) (cells [5, 10) × [10, 15) of 5-cell patches) gets that patch's embedding
    rows, cols = site_patch_positions([(7.5, 12.5), (5.0, 10.0)], PATCH)
    table = grid_sincos_embedding(2, 3, 16)  # [P, 16]
    emb = point_sincos_embedding(rows, cols, 16)
    torch.testing.assert_close(emb[0], table[1 * 3 + 2])
    assert not torch.allclose(emb[1], table[1 * 3 + 2])
    model = MultimodalCrossMAE(SPEC, small_model_config(), patch_size=PATCH, steps=STEPS)
    r, c = site_patch_positions(GAUGES.locations, PATCH)
    torch.testing.assert_close(model.space_enc_gauges, point_sincos_embedding(r, c, 32))


@pytest.mark.parametrize("static,options", [("token", {}), ("film", {"learned_space": True}),
                                            ("both", {"decoder_self_attn": True}),
                                            ("both", {"use_cross_attn": False, "memory": "own"})])
def test_forward_backward_finite_with_site_attributes_and_paths_agree(static, options):
    torch.manual_seed(0)
    cfg = small_model_config(static=static, **options)
    token_names, film_names = site_conditioning(SPEC, cfg)
    assert token_names == (("gauges",) if static != "film" else ())
    assert film_names == (("gauges",) if static != "token" else ())
    model = MultimodalCrossMAE(SPEC, cfg, patch_size=PATCH, steps=STEPS)
    for film in model.site_film.values():  # leave the identity start so FiLM acts
        for layer in film:
            torch.nn.init.normal_(layer.proj.weight, std=0.1)
    assert model.token_dims["gauges"] == 4 and model.token_dims["wells"] == 3
    batch = collator(cfg)(site_samples(4, seed=1))
    out = model(batch)
    assert torch.isfinite(out.loss)
    assert out.predictions["gauges"].shape == (batch.modalities["gauges"].queries.packed.total, 4)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    used = [n for n in grads if n.startswith(("site_embed.", "site_film."))]
    assert used and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in used if n.endswith("weight"))
    # the seed's path (padded encoder, loop decoder) gives the same loss on the same weights
    model.set_paths("padded", "loop")
    torch.testing.assert_close(model(batch).loss, out.loss, rtol=1e-4, atol=1e-5)


def test_site_attributes_change_the_predictions():
    torch.manual_seed(0)
    cfg = small_model_config(static="both")
    model = MultimodalCrossMAE(SPEC, cfg, patch_size=PATCH, steps=STEPS).eval()
    for film in model.site_film.values():
        for layer in film:
            torch.nn.init.normal_(layer.proj.weight, std=0.1)
    samples = site_samples(2, seed=2)
    base = model(collator(cfg)(samples)).predictions["gauges"]
    samples[0].site_static["gauges"][1] += 1.0  # group 1's attributes, sample 0 only
    changed = model(collator(cfg)(samples))
    idx = collator(cfg)(samples).modalities["gauges"].queries.index
    diff = (changed.predictions["gauges"] - base).abs().sum(-1)
    assert diff[idx[:, 0] == 1].max() == 0  # the other sample is untouched
    assert diff[idx[:, 0] == 0].max() > 0


def test_per_site_nse_and_kge_on_a_hand_made_case(tmp_path):
    # one window of 4 days, one group of 2 sites, one variable; days 1 and 2 hidden
    obs = np.array([1.0, 2.0, 3.0, 4.0])
    truth = np.zeros((1, 4, 1, 2, 1))
    truth[0, :, 0, 0, 0] = obs
    truth[0, :, 0, 1, 0] = [2.0, 2.0, 6.0, 2.0]
    recon = np.full_like(truth, np.nan)
    recon[0, 1:3, 0, 0, 0] = [2.0, 3.0]  # perfect on site a
    recon[0, 1:3, 0, 1, 0] = [4.0, 4.0]  # the mean of site b's masked days: NSE 0
    predicted = np.array([[[False], [True], [True], [False]]])
    store = {}
    collect_site_days(store, truth, recon, predicted, np.ones((1, 1, 2), dtype=bool), [["a", "b"]], [100])
    scores = _flow_scores(store, 0)
    a, b = scores["per_basin"]["a"], scores["per_basin"]["b"]
    assert a["days"] == 2 and a["nse"] == pytest.approx(1.0) and a["kge"] == pytest.approx(1.0)
    assert b["nse"] == pytest.approx(0.0)
    # KGE of b: r undefined (constant simulation) → NaN; median over sites skips it
    assert math.isnan(b["kge"]) and scores["median_kge"] == pytest.approx(1.0)
    assert scores["median_nse"] == pytest.approx(0.5)
    # baseline: interpolation between the visible days 0 and 3: a → [2, 3] (perfect), b → [2, 2]
    base = scores["baseline_interp"]["per_basin"]
    assert base["a"]["nse"] == pytest.approx(1.0)
    assert base["b"]["nse"] == pytest.approx(1.0 - (0.0 + 16.0) / 8.0)  # obs [2, 6] around 4: Σ = 8
    path = tmp_path / "sites.csv"
    write_site_csv(path, {"flow": scores}, {"a": (0, 0, 1.5, 2.5), "b": (0, 1, 3.0, 4.0)})
    lines = path.read_text().splitlines()
    assert lines[0].startswith("site,group,slot,row,col,variable,days,nse,kge") and len(lines) == 3
    assert lines[1].split(",")[:7] == ["a", "0", "0", "1.5", "2.5", "flow", "2"]
    land = np.zeros((6, 8), dtype=bool)
    land[1:5, 1:7] = True
    fig = site_nse_map(scores, {"a": (0, 0, 1.5, 2.5), "b": (0, 1, 3.0, 4.0)}, land, (6, 8), "flow")
    points = fig.axes[0].collections[-1]
    assert points.get_offsets().tolist() == [[2.5, 1.5], [4.0, 3.0]]  # (col, row) of each scored site
    np.testing.assert_allclose(points.get_array(), [1.0, 0.0])
    fig.savefig(tmp_path / "map.png")
    assert (tmp_path / "map.png").stat().st_size > 1000


def test_a_site_without_a_masked_observation_is_counted_apart_from_the_scored_ones():
    truth = np.zeros((1, 4, 1, 3, 1))
    truth[0, :, 0, 0, 0] = [1.0, 2.0, 3.0, 4.0]
    truth[0, :, 0, 1, 0] = [2.0, 2.0, 6.0, 2.0]
    truth[0, :, 0, 2, 0] = [5.0, np.nan, np.nan, 5.0]  # site c: nothing observed on the hidden days
    recon = np.full_like(truth, np.nan)
    recon[0, 1:3, 0, :, 0] = [[2.0, 4.0, 5.0], [3.0, 4.0, 5.0]]
    predicted = np.array([[[False], [True], [True], [False]]])
    store = {}
    collect_site_days(store, truth, recon, predicted, np.ones((1, 1, 3), dtype=bool), [["a", "b", "c"]], [100])
    scores = _flow_scores(store, 0)
    assert len(scores["per_basin"]) == 3 and math.isnan(scores["per_basin"]["c"]["nse"])
    assert scores["scored"] == 2 and scores["median_nse"] == pytest.approx(0.5)
