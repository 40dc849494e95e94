"""The model and mask options of the config: each bad value is refused naming its key; origin.yaml resolves."""

from pathlib import Path

import pytest

from crossmae.config import ConfigError, resolve_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, message", [
    ("model.fusion_depth=-1", "model.fusion_depth must be non-negative"),
    ("model.static=tokens", "model.static must be one of"),
    ("model.static_on=grids", "model.static_on must be 'all' or 'series'"),
    ("model.loss_reduction=mean", "model.loss_reduction must be one of"),
    ("model.dropout=1.0", r"model.dropout must be in \[0, 1\)"),
    ("mask.mode=blocks", "mask.mode must be one of"),
    ("mask.kept_mask_ratio=0.6", r"mask.kept_mask_ratio is a fraction of all valid tokens, so it must be in "
                                 r"\(0, 0.5\]"),
    ("model.use_fm_layers=[4]", r"the encoder has 4 layers \(enc_depth \+ fusion_depth\)"),
])
def test_bad_model_and_mask_options_name_their_key(override, message):
    extra = ["model.fusion_depth=1"] if "use_fm_layers" in override else []
    with pytest.raises(ConfigError, match=message):
        resolve_config(None, None, [*extra, override])


def test_fused_layers_count_as_encoder_layers_and_kept_ratio_may_be_empty():
    config = resolve_config(None, None, ["model.fusion_depth=2", "model.use_fm_layers=[3, 4]",
                                         "mask.kept_mask_ratio=0.25", "mask.kept_mask_ratio=null"])
    assert config.model.use_fm_layers == [3, 4] and config.mask.kept_mask_ratio is None


def test_origin_config_holds_the_seed_settings():
    config = resolve_config(None, str(ROOT / "configs" / "origin.yaml"))
    m = config.model
    assert (m.enc_dim, m.enc_heads, m.dec_dim, m.dec_depth, m.fusion_depth, m.dropout) == (256, 8, 128, 4, 1, 0.1)
    assert (m.static, m.static_on, m.loss_reduction) == ("both", "series", "samples")
    assert config.mask.mode == "unified" and config.mask.grid_ratio == config.mask.series_ratio == 0.4
    t = config.train
    assert (t.lr, t.beta1, t.beta2, t.weight_decay, t.grad_clip) == (1e-4, 0.9, 0.95, 0.05, 1.0)
    assert m.loss_weights == {"precip": 100.0, "soil_moisture": 10.0, "temperature": 10.0, "evaporation": 1.0,
                              "streamflow": 1.0}


def test_memory_drop_needs_the_joint_memory():
    with pytest.raises(ConfigError, match=r"model.memory_drop \(\['precip'\]\) needs model.memory 'joint'"):
        resolve_config(None, None, ["model.memory_drop=[precip]", "model.memory=own"])
