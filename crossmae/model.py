"""The multimodal CrossMAE on packed tokens (``docs/model.md``).

One encoder per modality runs on that modality's visible tokens only (with the static attributes
as a token and/or FiLM; a site set's site attributes per token, added and/or FiLM); the joint
memory is, per sample, every modality's encoder output, optionally passed through shared fusion
blocks; one decoder per modality reconstructs the predicted tokens from mask-token queries that
cross-attend to the memory. Split as MAE:
:meth:`forward_encoder`, :meth:`forward_decoder`, :meth:`forward_loss`.

Paths (the same weights, different layouts of the same arithmetic; ``crossmae.layers``):
    packed  every attention is one varlen kernel call over the batch, and the loss is the fused
            Triton kernel where it runs (``--fused``);
    padded  tokens padded to the longest sample, SDPA with a key-padding mask;
    loop    padded tokens and one SDPA call per sample (the seed's decoder).
The seed's path is the padded encoder with the loop decoder.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from crossmae.config import LOSS_REDUCTIONS, STATIC_MODES, ConfigError, ModelConfig
from crossmae.data.collate import CollateSettings, PackedBatch
from crossmae.data.sample import DatasetSpec
from crossmae.layers import (
    Block,
    CrossAttentionBlock,
    FiLM,
    grid_sincos_embedding,
    make_layout,
    point_sincos_embedding,
    sincos_embedding,
    site_patch_positions,
)
from crossmae.ops import AttentionBackend, resolve_backend
from crossmae.ops.loss import masked_sse
from crossmae.packed import Packed

ENCODER_PATHS = ("packed", "padded")
DECODER_PATHS = ("packed", "padded", "loop")


@dataclass
class LossTerms:
    """The loss of one forward, and what a caller needs to re-normalise it over several batches or processes.

    Attributes:
        loss: scalar, ``Σ_m weight_m · losses[m]``.
        losses: modality → scalar, ``sums[m] / normaliser``.
        sums: modality → scalar device tensor: the sum of squared errors over the counted values
            (``loss_reduction='values'``) or the sum over samples of each sample's mean squared error
            (``'samples'``).
        counts: modality → scalar device tensor: the counted values, or the samples with a counted value.
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    sums: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]


@dataclass
class ModelOutput(LossTerms):
    """What one forward returns: :class:`LossTerms` and the reconstructions.

    Attributes:
        predictions: modality → ``[total_pred, token_dim]`` packed reconstructions.
    """

    predictions: dict[str, torch.Tensor]


@dataclass
class EncoderOutput:
    """The memory the decoders read.

    Attributes:
        memory: ``[total_mem, enc_dim]`` the joint memory: per sample every modality's final encoder rows
            in modality order (after the fusion blocks when ``fusion_depth > 0``).
        feature_maps: the layers weighted feature maps mix, each ``[total_mem, enc_dim]`` in the same order
            (empty unless ``use_weighted_fm``).
    """

    memory: torch.Tensor
    feature_maps: list[torch.Tensor]

    def detach(self) -> EncoderOutput:
        return EncoderOutput(self.memory.detach(), [m.detach() for m in self.feature_maps])


def interpolation_prior(index: torch.Tensor, visible_index: torch.Tensor, visible_values: torch.Tensor,
                        steps: int) -> torch.Tensor:
    """Per query, the linear interpolation in time between its sample's nearest visible tokens before and after.

    Args:
        index: ``[n, 3]`` int64 (b, t, p) of the queries (a series: p = 0); none of them visible.
        visible_index: ``[total_vis, 3]`` int64 (b, t, p) of the visible tokens, in (sample, time) order.
        visible_values: ``[total_vis, F]`` their values (a visible series token's values are all finite).
        steps: an upper bound on t + 1 (the key of token (b, t) is ``b · steps + t``).

    Returns:
        ``[n, F]`` in the dtype of ``visible_values``: between two visible tokens of the query's sample, the
        linear interpolation at the query's day; with one on one side only, that token's values; with none, 0.
        Torch ops on the device only (a binary search of the query keys among the visible keys): no host read.
    """
    n_vis = visible_index.shape[0]
    b, t = index[:, 0], index[:, 1]  # [n] each
    vis_b, vis_t = visible_index[:, 0], visible_index[:, 1]  # [total_vis] each
    after = torch.searchsorted(vis_b * steps + vis_t, b * steps + t)  # [n] first visible token at or after
    # row n_vis is a sentinel of no sample, so a missing neighbour is a row like any other
    pad_b = torch.cat([vis_b, vis_b.new_full((1,), -1)])  # [total_vis + 1]
    pad_t = torch.cat([vis_t, vis_t.new_zeros(1)])  # [total_vis + 1]
    pad_v = torch.cat([visible_values, visible_values.new_zeros(1, visible_values.shape[1])])  # [total_vis + 1, F]
    before = torch.where(after > 0, after - 1, n_vis)  # [n]
    has_before, has_after = pad_b[before] == b, pad_b[after] == b  # [n] each
    t_before, t_after = pad_t[before], pad_t[after]  # [n] each
    both = has_before & has_after
    span = torch.where(both, t_after - t_before, 1).to(visible_values.dtype)  # [n]
    w_after = torch.where(both, (t - t_before).to(visible_values.dtype) / span, has_after.to(visible_values.dtype))
    w_before = torch.where(both, 1.0 - w_after, has_before.to(visible_values.dtype))  # [n]
    return w_before[:, None] * pad_v[before] + w_after[:, None] * pad_v[after]  # [n, F]


def static_conditioning(spec: DatasetSpec, cfg: ModelConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(modalities whose encoder takes a static token, modalities whose encoder blocks take FiLM), from
    ``model.static`` and ``model.static_on``; both empty when the data set has no static attributes."""
    if not spec.static_dim:
        return (), ()
    conditioned = tuple(m.name for m in spec.modalities if cfg.static_on == "all" or m.kind in ("series", "sites"))
    return (conditioned if cfg.static in ("token", "both") else (),
            conditioned if cfg.static in ("film", "both") else ())


def site_conditioning(spec: DatasetSpec, cfg: ModelConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(site sets whose tokens and decoder queries add their group's site-attribute embedding, site sets whose
    encoder blocks take FiLM of it per token), from ``model.static``: ``token`` the first, ``film`` the second,
    ``both`` both; only site sets with site attributes."""
    with_attrs = tuple(m.name for m in spec.sites if m.site_attrs)
    return (with_attrs if cfg.static in ("token", "both") else (),
            with_attrs if cfg.static in ("film", "both") else ())


class ModalityDecoder(nn.Module):
    """One modality's decoder: memory projection, mask-token queries, blocks, head."""

    def __init__(self, cfg: ModelConfig, token_dim: int, n_feature_maps: int):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(cfg.dec_dim))
        self.modality_token = nn.Parameter(torch.zeros(cfg.dec_dim))
        self.embed = nn.Linear(cfg.enc_dim, cfg.dec_dim)
        if cfg.use_cross_attn:
            self.blocks = nn.ModuleList(
                CrossAttentionBlock(cfg.dec_dim, cfg.dec_heads, cfg.mlp_ratio, cfg.decoder_self_attn, cfg.dropout)
                for _ in range(cfg.dec_depth)
            )
        else:
            self.blocks = nn.ModuleList(
                Block(cfg.dec_dim, cfg.dec_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.dec_depth)
            )
        self.feature_weights = None
        if cfg.use_weighted_fm:
            # decoder block i attends to sum_l w[l, i] * features_l, each block with its own norm
            self.feature_weights = nn.Parameter(torch.full((n_feature_maps, cfg.dec_depth), 1.0 / n_feature_maps))
            self.feature_norms = nn.ModuleList(nn.LayerNorm(cfg.enc_dim) for _ in range(cfg.dec_depth))
        self.norm = nn.LayerNorm(cfg.dec_dim)
        self.head = nn.Linear(cfg.dec_dim, token_dim)

    def memories(self, memory: torch.Tensor, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per decoder block, the projected memory ``[total_mem, dec_dim]``."""
        if self.feature_weights is None:
            projected = self.embed(memory)
            return [projected] * len(self.blocks)
        stack = torch.stack(feature_maps)  # [L, total_mem, enc_dim]
        mixed = torch.einsum("lnd,li->ind", stack, self.feature_weights.to(stack.dtype))  # [depth, total_mem, enc_dim]
        return [self.embed(norm(m)) for norm, m in zip(self.feature_norms, mixed.unbind(0))]


class MultimodalCrossMAE(nn.Module):
    """Multimodal CrossMAE over the modalities of ``spec``.

    Args:
        spec: the data set's modalities and static attribute count.
        cfg: model options (``docs/model.md``).
        patch_size: grid patch side in cells (sets grid token widths).
        steps: the longest window T (sets the temporal embedding table).
        fused: True runs every attention packed (``cfg.attn_backend``); False runs the seed's
            path (padded encoder, per-sample loop decoder).
    """

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, *, patch_size: int, steps: int, fused: bool = True):
        super().__init__()
        self.spec = spec
        self.cfg = cfg
        self.names = [m.name for m in spec.modalities]
        self.patch_size, self.steps = patch_size, steps
        self.token_dims = {m.name: {"grid": m.channels * patch_size**2, "sites": m.group_size * m.channels
                                    }.get(m.kind, m.channels) for m in spec.modalities}
        self._check_options()
        self.memory_names = tuple(n for n in self.names if n not in cfg.memory_drop)
        self.encoder_path, self.decoder_path = ("packed", "packed") if fused else ("padded", "loop")
        self.layers = cfg.enc_depth + cfg.fusion_depth
        self.fm_layers = sorted({i % self.layers for i in cfg.use_fm_layers}) if cfg.use_fm_layers \
            else list(range(self.layers))
        n_maps = len(self.fm_layers) + int(cfg.use_input)
        self.norm_pix_names = set(cfg.norm_pix_modalities or self.names) if cfg.norm_pix_loss else set()
        has_static = spec.static_dim > 0
        self.static_token_names, film_names = static_conditioning(spec, cfg)
        self.site_token_names, site_film_names = site_conditioning(spec, cfg)

        d = cfg.enc_dim
        encoded = self.memory_names  # the modalities whose encoders run
        self.embed = nn.ModuleDict({n: nn.Linear(self.token_dims[n], d) for n in encoded})
        self.modality_tokens = nn.ParameterDict({n: nn.Parameter(torch.zeros(d)) for n in encoded})
        self.encoders = nn.ModuleDict({
            n: nn.ModuleList(Block(d, cfg.enc_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.enc_depth))
            for n in encoded
        })
        self.encoder_norms = nn.ModuleDict({n: nn.LayerNorm(d) for n in encoded})
        # static attributes and their missing flags [B, 2S] → [B, d]
        self.static_embed = nn.Linear(2 * spec.static_dim, d) if has_static else None
        self.film = nn.ModuleDict({n: nn.ModuleList(FiLM(d, d) for _ in range(cfg.enc_depth))
                                   for n in film_names if n in encoded})
        # a site set's group attributes, missing flags and slot occupancy [K·A + K·A + K] → [d] per token: for the
        # encoder (added and/or FiLM) and the decoder queries (added)
        self.site_embed = nn.ModuleDict()
        for m in spec.sites:
            width = m.group_size * (2 * m.site_attrs + 1)
            parts = {"enc": nn.Linear(width, d)} if m.name in encoded and m.name in (
                *self.site_token_names, *site_film_names) else {}
            if m.name in self.site_token_names:
                parts["dec"] = nn.Linear(width, cfg.dec_dim)
            if parts:
                self.site_embed[m.name] = nn.ModuleDict(parts)
        self.site_film = nn.ModuleDict({n: nn.ModuleList(FiLM(d, d) for _ in range(cfg.enc_depth))
                                        for n in site_film_names if n in encoded})
        self.fusion = nn.ModuleList(Block(d, cfg.enc_heads, cfg.mlp_ratio, cfg.dropout)
                                    for _ in range(cfg.fusion_depth))
        if cfg.fusion_depth:
            self.fusion_tokens = nn.ParameterDict({n: nn.Parameter(torch.zeros(d)) for n in encoded})
            self.fusion_norm = nn.LayerNorm(d)
        self.decoders = nn.ModuleDict({n: ModalityDecoder(cfg, self.token_dims[n], n_maps) for n in self.names})
        self.interp_names = tuple(n for n in self.names if n in cfg.interp_prior)

        # fixed sin-cos position tables: time, patch position per grid modality, group centre per site set (in
        # patch units of the grid frame, the grids' frequencies: a group and the patch around it are near)
        self.register_buffer("time_enc", sincos_embedding(torch.arange(steps), d), persistent=False)
        self.register_buffer("time_dec", sincos_embedding(torch.arange(steps), cfg.dec_dim), persistent=False)
        self.learned_space = nn.ParameterDict()
        for m in spec.grids:
            rows, cols = -(-m.height // patch_size), -(-m.width // patch_size)
            for which, dim in (("enc", d), ("dec", cfg.dec_dim)):
                table = grid_sincos_embedding(rows, cols, dim)  # [P, dim]
                self.register_buffer(f"space_{which}_{m.name}", table, persistent=False)
                if cfg.learned_space:
                    self.learned_space[f"{which}_{m.name}"] = nn.Parameter(torch.zeros(rows * cols, dim))
        for m in spec.sites:
            rows, cols = site_patch_positions(m.locations, patch_size)  # [G] each
            for which, dim in (("enc", d), ("dec", cfg.dec_dim)):
                self.register_buffer(f"space_{which}_{m.name}", point_sincos_embedding(rows, cols, dim),
                                     persistent=False)  # [G, dim]
                if cfg.learned_space:
                    self.learned_space[f"{which}_{m.name}"] = nn.Parameter(torch.zeros(m.groups, dim))
        self.season = nn.ModuleDict({"enc": nn.Linear(2, d), "dec": nn.Linear(2, cfg.dec_dim)}) \
            if cfg.day_of_year else None
        self.apply(self._init_weights)
        for p in [*self.modality_tokens.values(), *(dec.mask_token for dec in self.decoders.values()),
                  *(dec.modality_token for dec in self.decoders.values()), *self.learned_space.values(),
                  *(self.fusion_tokens.values() if cfg.fusion_depth else ())]:
            nn.init.normal_(p, std=0.02)
        for film in [*self.film.values(), *self.site_film.values()]:
            for layer in film:
                layer.reset_parameters()
        for name in self.interp_names:  # the untrained decoder predicts the interpolation itself
            nn.init.zeros_(self.decoders[name].head.weight)
            nn.init.zeros_(self.decoders[name].head.bias)
        self._checked_settings: CollateSettings | None = None

    def _check_options(self) -> None:
        cfg = self.cfg
        not_series = [n for n in cfg.interp_prior if n in self.names and self.spec[n].kind != "series"]
        if not_series:
            raise ConfigError(f"model.interp_prior names {not_series}, which are not series modalities (the prior "
                              f"interpolates one token per day)")
        absent = [n for n in cfg.interp_prior if n not in self.names]
        if absent:
            warnings.warn(f"model.interp_prior names {absent}, which are not modalities of this data set "
                          f"({self.names}): ignored", stacklevel=3)
        normed = set(cfg.norm_pix_modalities or self.names) if cfg.norm_pix_loss else set()
        both = [n for n in cfg.interp_prior if n in normed]
        if both:
            raise ConfigError(f"model.interp_prior and model.norm_pix_loss both name {both}: the interpolation is in "
                              f"the data's units, not per token standardised")
        if cfg.use_weighted_fm and not cfg.use_cross_attn:
            raise ValueError("model.use_weighted_fm needs model.use_cross_attn (it feeds cross-attention)")
        if cfg.static not in STATIC_MODES:
            raise ValueError(f"model.static must be one of {STATIC_MODES}, got {cfg.static!r}")
        if cfg.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"model.loss_reduction must be one of {LOSS_REDUCTIONS}, got {cfg.loss_reduction!r}")
        dropped = [n for n in cfg.memory_drop if n not in self.names]
        if dropped or set(cfg.memory_drop) >= set(self.names):
            raise ValueError(f"model.memory_drop must name some, not all, of the modalities {self.names}, got "
                             f"{cfg.memory_drop}")
        if cfg.memory_drop and cfg.memory != "joint":
            raise ValueError(f"model.memory_drop needs model.memory 'joint', got {cfg.memory!r}")
        unknown = [n for n in cfg.norm_pix_modalities if n not in self.names]
        if unknown:
            raise ValueError(f"model.norm_pix_modalities names {unknown}, which are not modalities ({self.names})")
        if cfg.norm_pix_loss:
            single = [n for n in (cfg.norm_pix_modalities or self.names) if self.token_dims[n] < 2]
            if single:
                raise ValueError(
                    f"model.norm_pix_loss normalises each target token by its own mean and variance, but the tokens "
                    f"of {single} hold one value each (they would all become 0): list the modalities it should "
                    f"apply to in model.norm_pix_modalities")

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def set_paths(self, encoder: str | None = None, decoder: str | None = None) -> None:
        """Choose the attention layouts (benchmarks compare them on the same weights)."""
        if encoder is not None:
            if encoder not in ENCODER_PATHS:
                raise ValueError(f"encoder path must be one of {ENCODER_PATHS}, got {encoder!r}")
            self.encoder_path = encoder
        if decoder is not None:
            if decoder not in DECODER_PATHS:
                raise ValueError(f"decoder path must be one of {DECODER_PATHS}, got {decoder!r}")
            self.decoder_path = decoder

    def collate_settings(self, *, standard_decoder: bool | None = None) -> CollateSettings:
        """The settings a collator needs for this model (``crossmae.data.loader.make_collator`` uses them)."""
        return CollateSettings(
            patch_size=self.patch_size, steps=self.steps, memory=self.cfg.memory,
            standard_decoder=not self.cfg.use_cross_attn if standard_decoder is None else standard_decoder,
            static_tokens=self.static_token_names, calendar=self.cfg.day_of_year,
            memory_modalities=self.memory_names,
        )

    def check_batch(self, batch: PackedBatch) -> None:
        """Raise ValueError when ``batch``'s collator was built with settings this model can't use (checked once
        per distinct settings)."""
        got = batch.settings
        if got == self._checked_settings:
            return
        want = self.collate_settings()
        problems = []
        if got.patch_size != want.patch_size:
            problems.append(f"patch_size {got.patch_size} (the model's is {want.patch_size})")
        if got.steps > want.steps:
            problems.append(f"steps {got.steps} (the model's time table holds {want.steps})")
        if got.static_tokens != want.static_tokens:
            problems.append(f"static tokens for {list(got.static_tokens)} (model.static={self.cfg.static!r}, "
                            f"static_on={self.cfg.static_on!r} wants {list(want.static_tokens)})")
        if want.calendar and not got.calendar:
            problems.append("no day of year (model.day_of_year is on)")
        if want.standard_decoder and not got.standard_decoder:
            problems.append("no standard decoder sequences (model.use_cross_attn is off)")
        if got.memory_modalities != want.memory_modalities:
            problems.append(f"memory modalities {list(got.memory_modalities)} (model.memory_drop leaves "
                            f"{list(want.memory_modalities)})")
        if want.standard_decoder and got.memory != want.memory:
            problems.append(f"memory {got.memory!r} (model.memory is {want.memory!r})")
        if problems:
            raise ValueError("the batch's collator does not match the model: " + "; ".join(problems)
                             + ". Build it with crossmae.data.loader.make_collator(config, dataset).")
        self._checked_settings = got

    def _layout(self, path: str, q: Packed, k: Packed, x: torch.Tensor, heads: int):
        """The attention layout of ``path`` for rows like ``x [total, d]`` split in ``heads`` heads; on the packed
        path the varlen backend is resolved here, once for every block of the stage."""
        backend: str | AttentionBackend = self.cfg.attn_backend
        if path == "packed" and not torch.compiler.is_compiling():
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            backend = resolve_backend(backend, device=x.device, dtype=dtype, head_dim=x.shape[-1] // heads,
                                      needs_backward=torch.is_grad_enabled())
        return make_layout(path, q, k, backend)

    # -- embeddings --------------------------------------------------------------------------
    def _position(self, name: str, index: torch.Tensor, which: str, batch: PackedBatch) -> torch.Tensor:
        """Position embedding ``[n, d]`` of tokens at ``index [n, 3]`` (b, t, p)."""
        b, t, p = index.unbind(1)
        pos = getattr(self, f"time_{which}")[t]  # [n, d]
        if self.spec[name].kind in ("grid", "sites"):
            pos = pos + getattr(self, f"space_{which}_{name}")[p]
            if self.cfg.learned_space:
                pos = pos + self.learned_space[f"{which}_{name}"][p]
        if self.season is not None:
            angle = batch.day_of_year[b, t] * (2.0 * torch.pi / 365.25)  # [n]
            pos = pos + self.season[which](torch.stack([angle.sin(), angle.cos()], dim=-1))
        return pos

    def _site_embedding(self, name: str, index: torch.Tensor, which: str, batch: PackedBatch) -> torch.Tensor:
        """Site-attribute embedding ``[n, d]`` of site-set tokens at ``index [n, 3]`` (b, t, p = group): a linear
        map of the group's attributes, their missing flags and its slots' occupancy."""
        attrs = batch.modalities[name].site_attributes
        b, _, g = index.unbind(1)
        values = attrs.values[b, g]  # [n, K·A]
        cond = torch.cat([values, attrs.missing[b, g].to(values.dtype), attrs.occupied[b, g].to(values.dtype)],
                         dim=-1)  # [n, K·(2A + 1)]
        return self.site_embed[name][which](cond)

    def _static_embedding(self, batch: PackedBatch) -> torch.Tensor | None:
        """``[B, enc_dim]`` from the static attributes and their missing flags (None without attributes)."""
        if self.static_embed is None:
            return None
        static = batch.static
        return self.static_embed(torch.cat([static.values, static.missing.to(static.values.dtype)], dim=-1))

    # -- encoder ---------------------------------------------------------------------------
    def forward_encoder(self, batch: PackedBatch) -> EncoderOutput:
        """Encode each modality's visible tokens, gather the joint memory, run the fusion blocks."""
        self.check_batch(batch)
        cfg = self.cfg
        static = self._static_embedding(batch)
        keep_maps = cfg.use_weighted_fm
        n_encoder_maps = int(cfg.use_input) + sum(i < cfg.enc_depth for i in self.fm_layers) if keep_maps else 0
        outs, maps = [], [[] for _ in range(n_encoder_maps)]  # per feature map, one entry per modality
        for name in self.memory_names:
            enc = batch.modalities[name].encoder
            x = self.embed[name](enc.values) + self._position(name, enc.index, "enc", batch)
            x = x + self.modality_tokens[name]  # [total_vis, enc_dim]
            site = self._site_embedding(name, enc.index, "enc", batch) if name in self.site_film or \
                name in self.site_token_names else None
            if name in self.site_token_names:
                x = x + site
            if name in self.static_token_names:
                x = torch.cat([static, x])[enc.order]  # [total_seq, enc_dim]
                if name in self.site_film:
                    site = torch.cat([site.new_zeros(batch.batch_size, site.shape[1]), site])[enc.order]
            layout = self._layout(self.encoder_path, enc.seq, enc.seq, x, cfg.enc_heads)
            x = layout.enter(x)
            layer_maps = [x] if cfg.use_input else []
            for i, block in enumerate(self.encoders[name]):
                x = block(x, layout)
                if name in self.film:
                    x = self.film[name][i](x, static, layout)
                if name in self.site_film:
                    x = self.site_film[name][i].forward_rows(x, site, layout)
                if keep_maps and i in self.fm_layers:
                    layer_maps.append(x)
            outs.append(layout.leave(self.encoder_norms[name](x)))  # [total_seq, enc_dim]
            if keep_maps:
                for slot, m in zip(maps, layer_maps):
                    slot.append(layout.leave(m))
        order = batch.memory.order
        maps = [torch.cat(per_modality)[order] for per_modality in maps]  # [total_mem, enc_dim] each
        if not cfg.fusion_depth:
            return EncoderOutput(torch.cat(outs)[order], maps)  # [total_mem, enc_dim]
        fused = [out + self.fusion_tokens[n] for n, out in zip(self.memory_names, outs)]
        x = torch.cat(fused)[order]  # [total_mem, enc_dim]
        layout = self._layout(self.encoder_path, batch.memory.packed, batch.memory.packed, x, cfg.enc_heads)
        x = layout.enter(x)
        for j, block in enumerate(self.fusion):
            x = block(x, layout)
            if keep_maps and cfg.enc_depth + j in self.fm_layers:
                maps.append(layout.leave(x))
        return EncoderOutput(layout.leave(self.fusion_norm(x)), maps)

    # -- decoder ---------------------------------------------------------------------------
    def _queries(self, name: str, index: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        decoder = self.decoders[name]
        x = decoder.mask_token + decoder.modality_token + self._position(name, index, "dec", batch)  # [n, dec_dim]
        if name in self.site_token_names:
            x = x + self._site_embedding(name, index, "dec", batch)
        return x

    def _decode_cross(self, batch: PackedBatch, name: str, memories: list[torch.Tensor], mem: Packed):
        mb = batch.modalities[name]
        path, heads = self.decoder_path, self.cfg.dec_heads
        queries = mb.queries.packed
        x = self._queries(name, mb.queries.index, batch)  # [total_pred, dec_dim]
        cross = self._layout(path, queries, mem, x, heads)
        self_layout = self._layout(path, queries, queries, x, heads) if self.cfg.decoder_self_attn else None
        x = cross.enter(x)
        memories = [cross.enter(m, keys=True) for m in memories]
        for block, memory in zip(self.decoders[name].blocks, memories):
            x = block(x, memory, cross, self_layout)
        return cross.leave(x)  # [total_pred, dec_dim]

    def _decode_standard(self, batch: PackedBatch, name: str, memory: torch.Tensor):
        """The standard MAE decoder: self-attention over the memory and every hidden position."""
        mb = batch.modalities[name]
        seqs = mb.standard
        queries = self._queries(name, mb.hidden.index, batch)  # [total_hidden, dec_dim]
        x = torch.cat([memory, queries])[seqs.order]  # [total_seq, dec_dim]
        layout = self._layout(self.decoder_path, seqs.seq, seqs.seq, x, self.cfg.dec_heads)
        x = layout.enter(x)
        for block in self.decoders[name].blocks:
            x = block(x, layout)
        return layout.leave(x)[seqs.query_rows][mb.hidden.predicted_rows]  # [total_pred, dec_dim]

    def forward_decoder(self, batch: PackedBatch, encoded: EncoderOutput) -> dict[str, torch.Tensor]:
        """Reconstruct each modality's predicted tokens → ``[total_pred, token_dim]`` per modality."""
        predictions = {}
        for name in self.names:
            decoder = self.decoders[name]
            rows, maps, mem = encoded.memory, encoded.feature_maps, batch.memory.packed
            if self.cfg.memory == "own":
                own = batch.memory.rows[name]  # [total_seq] this modality's memory rows
                rows, maps, mem = rows[own], [m[own] for m in maps], batch.modalities[name].encoder.seq
            memories = decoder.memories(rows, maps)
            if self.cfg.use_cross_attn:
                x = self._decode_cross(batch, name, memories, mem)
            else:
                x = self._decode_standard(batch, name, memories[0])
            predictions[name] = decoder.head(decoder.norm(x))
            if name in self.interp_names:
                mb = batch.modalities[name]
                prior = interpolation_prior(mb.queries.index, mb.encoder.index, mb.encoder.values, self.steps)
                predictions[name] = predictions[name] + prior.to(predictions[name].dtype)
        return predictions

    # -- loss --------------------------------------------------------------------------------
    def normalized_targets(self, name: str, values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``values [n, token_dim]`` standardised per token by the mean and unbiased variance of its counted
        values (``weight`` > 0) when ``norm_pix_loss`` applies to ``name``; else unchanged."""
        if name not in self.norm_pix_names:
            return values
        count = weight.sum(-1, keepdim=True)  # [n, 1]
        mean = (values * weight).sum(-1, keepdim=True) / count.clamp_min(1.0)
        var = ((values - mean).square() * weight).sum(-1, keepdim=True) / (count - 1.0).clamp_min(1.0)
        return (values - mean) / (var + 1e-6).sqrt()

    def loss_counts(self, batch: PackedBatch) -> dict[str, torch.Tensor]:
        """modality → scalar device tensor: what its loss sum is divided by (``model.loss_reduction``): its counted
        values, or its samples with at least one counted value. Data-parallel training sums these over processes
        before the forward (no host read)."""
        counts = {}
        for name in self.names:
            mb = batch.modalities[name]
            weight = mb.targets.weight  # [total_pred, token_dim]
            if self.cfg.loss_reduction == "values":
                counts[name] = weight.sum()
            else:
                n = weight.new_zeros(batch.batch_size).index_add(0, mb.queries.index[:, 0], weight.sum(-1))  # [B]
                counts[name] = (n > 0).sum().to(weight.dtype)
        return counts

    def forward_loss(self, batch: PackedBatch, predictions: dict[str, torch.Tensor],
                     normalizers: dict[str, float | torch.Tensor] | None = None) -> LossTerms:
        """Masked MSE per modality over the predicted tokens' counted values (``model.loss_reduction``).

        ``normalizers[m]`` divides modality m's sum (default: its count in this batch; data-parallel training
        passes the global count / world size). Nothing is read back to the host.
        """
        losses, sums = {}, {}
        counts = self.loss_counts(batch)
        total = None
        for name, pred in predictions.items():
            mb = batch.modalities[name]
            weight = mb.targets.weight  # [total_pred, token_dim]
            target = self.normalized_targets(name, mb.targets.values, weight)
            if self.cfg.loss_reduction == "values":
                sums[name] = masked_sse(pred, target, weight, fused=self.decoder_path == "packed")
            else:
                per_row = ((pred.float() - target).square() * weight).sum(-1)  # [total_pred]
                sample = mb.queries.index[:, 0]  # [total_pred]
                sse = per_row.new_zeros(batch.batch_size).index_add(0, sample, per_row)  # [B]
                n = per_row.new_zeros(batch.batch_size).index_add(0, sample, weight.sum(-1))  # [B]
                sums[name] = (sse / n.clamp_min(1.0)).sum()
            norm = counts[name] if normalizers is None else normalizers[name]
            norm = torch.as_tensor(norm, dtype=sums[name].dtype, device=sums[name].device)
            losses[name] = sums[name] / norm.clamp_min(1e-12)  # a modality without values has sum 0
            weighted = losses[name] * self.cfg.loss_weights.get(name, 1.0)
            total = weighted if total is None else total + weighted
        return LossTerms(loss=total, losses=losses, sums=sums, counts=counts)

    def forward(self, batch: PackedBatch, normalizers: dict[str, float | torch.Tensor] | None = None) -> ModelOutput:
        encoded = self.forward_encoder(batch)
        predictions = self.forward_decoder(batch, encoded)
        terms = self.forward_loss(batch, predictions, normalizers)
        return ModelOutput(loss=terms.loss, losses=terms.losses, sums=terms.sums, counts=terms.counts,
                           predictions=predictions)
