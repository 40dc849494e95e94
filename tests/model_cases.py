"""Small random samples for model tests (independent of the synthetic data set)."""

from __future__ import annotations

import torch

from crossmae.config import MaskConfig, ModelConfig
from crossmae.data.collate import MaskingCollator
from crossmae.data.sample import DatasetSpec, ModalitySpec, Sample
from crossmae.model import static_conditioning

SPEC = DatasetSpec(
    modalities=(
        ModalitySpec("precip", "grid", channels=1, height=12, width=10),
        ModalitySpec("temp", "grid", channels=2, height=12, width=10),
        ModalitySpec("flow", "series", channels=1),
        ModalitySpec("evap", "series", channels=2),
    ),
    static_dim=3,
)
STEPS = 6
PATCH = 4


def random_samples(n: int, seed: int = 0, spec: DatasetSpec = SPEC, steps: int = STEPS) -> list[Sample]:
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        s = Sample(noise_seed=seed * 100 + i, first_day=11_000 + 37 * i, meta={"index": i})
        for m in spec.grids:
            basin = torch.rand(m.height, m.width, generator=gen) < 0.3 + 0.1 * (i % 5)
            values = torch.randn(steps, m.channels, m.height, m.width, generator=gen)
            values[torch.rand(values.shape, generator=gen) < 0.03] = float("nan")
            s.grids[m.name], s.basin_masks[m.name] = values, basin
        for m in spec.series:
            values = torch.randn(steps, m.channels, generator=gen)
            values[torch.rand(steps, generator=gen) < 0.2] = float("nan")
            s.series[m.name] = values
        if i == 1 and spec.series:  # one sample whose first series is entirely missing
            s.series[spec.series[0].name][:] = float("nan")
        if spec.static_dim:
            s.static = torch.randn(spec.static_dim, generator=gen)
        samples.append(s)
    return samples


def small_model_config(**overrides) -> ModelConfig:
    cfg = ModelConfig(enc_dim=32, enc_depth=2, enc_heads=2, dec_dim=32, dec_depth=2, dec_heads=2, mlp_ratio=2.0)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def collate(samples, mask: MaskConfig | None = None, **kw):
    mask = mask or MaskConfig(grid_ratio=0.6, series_ratio=0.5)
    return MaskingCollator(SPEC, mask, PATCH, STEPS, **kw)(samples)


def collator_for(cfg: ModelConfig, mask: MaskConfig | None = None, spec: DatasetSpec = SPEC, steps: int = STEPS,
                 patch: int = PATCH) -> MaskingCollator:
    """The collator a model with options ``cfg`` expects (as ``crossmae.data.loader.make_collator`` builds it)."""
    mask = mask or MaskConfig(grid_ratio=0.6, series_ratio=0.5)
    static_tokens, _ = static_conditioning(spec, cfg)
    return MaskingCollator(spec, mask, patch, steps, memory=cfg.memory, standard_decoder=not cfg.use_cross_attn,
                           static_tokens=static_tokens, calendar=cfg.day_of_year,
                           memory_modalities=[m.name for m in spec.modalities if m.name not in cfg.memory_drop])
