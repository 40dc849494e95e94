"""Named workload presets shared by benchmarks and tests (``docs/presets.md``).

A preset fixes the token counts of one training batch (one or more grid modalities and, for
``regional``, a site set) and the model's widths. :func:`attention_lengths` turns it into the
per-sample query and key lengths of a grid decoder's cross-attention (queries: one grid's masked
tokens; keys: the joint memory, every modality's visible tokens), which is what the attention
benchmarks time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crossmae.data.collate import hidden_count


@dataclass(frozen=True)
class WorkloadPreset:
    """One batch's shape and the model widths.

    Attributes:
        name: preset name.
        batch: B samples.
        steps: T time steps per sample.
        patches: P valid patches per frame (the most, for ragged presets).
        patch_grid: patches per frame side (``patch_grid ** 2`` patch positions per frame); with
            ``patch_cols`` the rows of a non-square patch grid.
        patch_cols: columns of a non-square patch grid (None: square).
        patch_size: cells per patch side (one channel: ``patch_dim = patch_size ** 2`` values).
        mask_ratio: fraction of each sample's valid tokens hidden from the encoder.
        enc_dim, enc_depth, enc_heads: encoder width, layers, heads.
        dec_dim, dec_depth, dec_heads: decoder width, layers, heads.
        min_patches: fewest valid patches per frame (ragged presets; equals ``patches`` otherwise).
        max_missing_steps: largest fraction of missing time steps per sample (ragged presets).
        grids: grid modalities, each with ``patches`` valid patches per frame (their visible tokens are all
            in the joint memory).
        site_groups: G, site groups of a site set (0: none); its tokens are (group, day).
        site_group_size: K, sites per group (a site token holds ``K·site_variables`` values).
        site_variables: F, variables per site.
        site_missing: fraction of (group, day) tokens without any value.
        site_ratio: fraction of a sample's valid site tokens hidden from the encoder.
    """

    name: str
    batch: int
    steps: int
    patches: int
    patch_grid: int = 10
    patch_size: int = 10
    mask_ratio: float = 0.75
    enc_dim: int = 256
    enc_depth: int = 6
    enc_heads: int = 8
    dec_dim: int = 128
    dec_depth: int = 4
    dec_heads: int = 8
    min_patches: int | None = None
    max_missing_steps: float = 0.0
    patch_cols: int | None = None
    grids: int = 1
    site_groups: int = 0
    site_group_size: int = 8
    site_variables: int = 2
    site_missing: float = 0.0
    site_ratio: float = 0.5

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2

    @property
    def dec_head_dim(self) -> int:
        return self.dec_dim // self.dec_heads

    @property
    def is_ragged(self) -> bool:
        return (self.min_patches is not None and self.min_patches != self.patches) or self.max_missing_steps > 0


PRESETS: dict[str, WorkloadPreset] = {
    "seed": WorkloadPreset("seed", batch=8, steps=90, patches=94),
    "wide": WorkloadPreset("wide", batch=8, steps=90, patches=94, enc_dim=512, dec_dim=512, dec_heads=8),
    "ragged": WorkloadPreset("ragged", batch=8, steps=90, patches=94, min_patches=60, max_missing_steps=0.2),
    "cpu": WorkloadPreset("cpu", batch=4, steps=16, patches=94),
    # a region (290 × 180 cells in 10 × 10-cell patches: 29 × 18 positions, 94 on land), 3 grids and ≈ 600 gauges
    # in 76 groups of 8 with riverflow and evaporation
    "regional": WorkloadPreset("regional", batch=8, steps=90, patches=94, patch_grid=29, patch_cols=18, grids=3,
                               site_groups=76, site_group_size=8, site_variables=2, site_missing=0.1),
}


def get_preset(name: str) -> WorkloadPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}") from None


def valid_tokens(preset: WorkloadPreset, seed: int = 0) -> list[int]:
    """Valid tokens per sample: patches per frame times the time steps that are not missing."""
    gen = torch.Generator().manual_seed(seed)
    counts = []
    for _ in range(preset.batch):
        low = preset.min_patches if preset.min_patches is not None else preset.patches
        patches = int(torch.randint(low, preset.patches + 1, (1,), generator=gen))
        missing = float(torch.rand(1, generator=gen)) * preset.max_missing_steps
        steps = preset.steps - int(round(missing * preset.steps))
        counts.append(patches * steps)
    return counts


def site_tokens(preset: WorkloadPreset) -> list[int]:
    """Valid site tokens per sample: ``site_groups · steps`` less the ``site_missing`` fraction (0 without a site
    set)."""
    missing = int(round(preset.site_missing * preset.site_groups * preset.steps))
    return [preset.site_groups * preset.steps - missing] * preset.batch


def attention_lengths(preset: WorkloadPreset, seed: int = 0) -> tuple[list[int], list[int]]:
    """Per-sample (query, key) lengths of a grid decoder's cross-attention: one grid's masked tokens vs the joint
    memory's visible tokens (every grid's and the site set's)."""
    valid = valid_tokens(preset, seed)
    masked = hidden_count(torch.tensor(valid), preset.mask_ratio).tolist()
    sites = site_tokens(preset)
    site_visible = [n - m for n, m in zip(sites, hidden_count(torch.tensor(sites), preset.site_ratio).tolist())]
    visible = [preset.grids * (n - m) + s for n, m, s in zip(valid, masked, site_visible)]
    return masked, visible


def attention_flops(lengths_q: list[int], lengths_k: list[int], heads: int, head_dim: int) -> tuple[float, float]:
    """Forward and backward FLOPs over the real lengths: 4·Σ Lq·Lk·H·D, backward 2.5× forward."""
    fwd = 4.0 * sum(lq * lk for lq, lk in zip(lengths_q, lengths_k)) * heads * head_dim
    return fwd, 2.5 * fwd
