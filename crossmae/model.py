"""The multimodal CrossMAE on packed tokens (DESIGN §4, §6).

One encoder per modality runs on that modality's visible tokens only (plus one static-attribute
token per sample); the joint memory is, per sample, every modality's encoder output; one
decoder per modality reconstructs the predicted tokens from mask-token queries that
cross-attend to the memory. Split as MAE: :meth:`forward_encoder`, :meth:`forward_decoder`,
:meth:`forward_loss`.

Paths (the same weights, different layouts of the same arithmetic):
    packed  every attention is one varlen kernel call over the batch, and the loss is the fused
            Triton kernel where it runs (``--fused``);
    padded  tokens padded to the longest sample, SDPA with a key-padding mask;
    loop    padded tokens and one SDPA call per sample (the seed's decoder).
The seed's path is the padded encoder with the loop decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from crossmae.config import ModelConfig
from crossmae.data.collate import ModalityBatch, PackedBatch
from crossmae.data.sample import DatasetSpec
from crossmae.layers import (
    Block,
    CrossAttentionBlock,
    LoopLayout,
    PackedLayout,
    PaddedLayout,
    grid_sincos_embedding,
    sincos_embedding,
)
from crossmae.ops.loss import masked_sse
from crossmae.packed import Packed, key_padding_mask, pad_packed, unpad

ENCODER_PATHS = ("packed", "padded")
DECODER_PATHS = ("packed", "padded", "loop")


@dataclass
class ModelOutput:
    """What one forward returns.

    Attributes:
        loss: scalar, the weighted sum of the per-modality losses.
        losses: modality → scalar loss (sum of squared errors / normaliser).
        sse: modality → scalar sum of squared errors over the counted values.
        predictions: modality → ``[total_pred, token_dim]`` packed reconstructions.
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    sse: dict[str, torch.Tensor]
    predictions: dict[str, torch.Tensor]


@dataclass
class EncodedModality:
    """out: ``[total_enc, enc_dim]`` final (normed) encoder rows; layers: feature maps for
    weighted feature maps (empty unless ``use_weighted_fm``)."""

    out: torch.Tensor
    layers: list[torch.Tensor]


def _pad(x: torch.Tensor, packed: Packed) -> torch.Tensor:
    return pad_packed(x, packed.cu_seqlens, packed.max_seqlen)  # [B, L, d]


def _layout(path: str, q: Packed, k: Packed, backend: str):
    if path == "packed":
        return PackedLayout(q, k, backend)
    if path == "padded":
        return PaddedLayout(key_padding_mask(k.cu_seqlens, k.max_seqlen))
    return LoopLayout(tuple(q.lengths.tolist()), tuple(k.lengths.tolist()))


class ModalityDecoder(nn.Module):
    """One modality's decoder: memory projection, mask-token queries, blocks, head."""

    def __init__(self, cfg: ModelConfig, token_dim: int, n_feature_maps: int):
        super().__init__()
        self.use_cross_attn = cfg.use_cross_attn
        self.mask_token = nn.Parameter(torch.zeros(cfg.dec_dim))
        self.modality_token = nn.Parameter(torch.zeros(cfg.dec_dim))
        self.embed = nn.Linear(cfg.enc_dim, cfg.dec_dim)
        if cfg.use_cross_attn:
            self.blocks = nn.ModuleList(
                CrossAttentionBlock(cfg.dec_dim, cfg.dec_heads, cfg.mlp_ratio, cfg.decoder_self_attn)
                for _ in range(cfg.dec_depth)
            )
        else:
            self.blocks = nn.ModuleList(Block(cfg.dec_dim, cfg.dec_heads, cfg.mlp_ratio) for _ in range(cfg.dec_depth))
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
        cfg: model options (DESIGN §6).
        patch_size: grid patch side in cells (sets grid token widths).
        steps: the longest window T (sets the temporal embedding table).
        fused: True runs every attention packed (``cfg.attn_backend``); False runs the seed's
            path (padded encoder, per-sample loop decoder).
    """

    def __init__(self, spec: DatasetSpec, cfg: ModelConfig, *, patch_size: int, steps: int, fused: bool = True):
        super().__init__()
        if cfg.use_weighted_fm and not cfg.use_cross_attn:
            raise ValueError("model.use_weighted_fm needs model.use_cross_attn (it feeds cross-attention)")
        self.spec = spec
        self.cfg = cfg
        self.names = [m.name for m in spec.modalities]
        self.encoder_path, self.decoder_path = ("packed", "packed") if fused else ("padded", "loop")
        depth = cfg.enc_depth
        self.fm_layers = [i % depth for i in cfg.use_fm_layers] if cfg.use_fm_layers else list(range(depth))
        n_maps = len(self.fm_layers) + int(cfg.use_input)

        token_dims = {m.name: (m.channels * patch_size**2 if m.kind == "grid" else m.channels) for m in spec.modalities}
        self.token_dims = token_dims
        self.embed = nn.ModuleDict({n: nn.Linear(d, cfg.enc_dim) for n, d in token_dims.items()})
        self.modality_tokens = nn.ParameterDict({n: nn.Parameter(torch.zeros(cfg.enc_dim)) for n in self.names})
        self.encoders = nn.ModuleDict({
            n: nn.ModuleList(Block(cfg.enc_dim, cfg.enc_heads, cfg.mlp_ratio) for _ in range(depth)) for n in self.names
        })
        self.encoder_norms = nn.ModuleDict({n: nn.LayerNorm(cfg.enc_dim) for n in self.names})
        self.static_embed = nn.Linear(spec.static_dim, cfg.enc_dim) if spec.static_dim else None
        self.decoders = nn.ModuleDict({n: ModalityDecoder(cfg, token_dims[n], n_maps) for n in self.names})

        # fixed sin-cos position tables: time, and patch position per grid modality
        self.register_buffer("time_enc", sincos_embedding(torch.arange(steps), cfg.enc_dim), persistent=False)
        self.register_buffer("time_dec", sincos_embedding(torch.arange(steps), cfg.dec_dim), persistent=False)
        for m in spec.grids:
            rows, cols = -(-m.height // patch_size), -(-m.width // patch_size)
            for which, dim in (("enc", cfg.enc_dim), ("dec", cfg.dec_dim)):
                table = grid_sincos_embedding(rows, cols, dim)  # [P, dim]
                self.register_buffer(f"space_{which}_{m.name}", table, persistent=False)
        self.apply(self._init_weights)
        for p in [*self.modality_tokens.values(), *(d.mask_token for d in self.decoders.values()),
                  *(d.modality_token for d in self.decoders.values())]:
            nn.init.normal_(p, std=0.02)

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

    def _position(self, name: str, t: torch.Tensor, p: torch.Tensor, which: str) -> torch.Tensor:
        pos = getattr(self, f"time_{which}")[t]  # [n, d]
        if self.spec[name].kind == "grid":
            pos = pos + getattr(self, f"space_{which}_{name}")[p]
        return pos

    # -- encoder ---------------------------------------------------------------------------
    def forward_encoder(self, batch: PackedBatch) -> dict[str, EncodedModality]:
        """Encode each modality's visible tokens (+ the static token) → packed encoder rows."""
        cfg = self.cfg
        static = None
        if self.static_embed is not None:
            static = self.static_embed(batch.static)  # [B, enc_dim]
        encoded = {}
        for name in self.names:
            mb = batch.modalities[name]
            tokens = self.embed[name](mb.vis_values)  # [total_vis, enc_dim]
            tokens = tokens + self._position(name, mb.vis_t, mb.vis_p, "enc") + self.modality_tokens[name]
            rows = tokens if static is None else torch.cat([static, tokens])
            x = rows[mb.enc_order]  # [total_enc, enc_dim]
            if self.encoder_path == "padded":
                x = _pad(x, mb.enc)  # [B, L, enc_dim]
            layout = _layout(self.encoder_path, mb.enc, mb.enc, cfg.attn_backend)
            maps = [x] if cfg.use_input else []
            for i, block in enumerate(self.encoders[name]):
                x = block(x, layout)
                if cfg.use_weighted_fm and i in self.fm_layers:
                    maps.append(x)
            x = self.encoder_norms[name](x)
            if self.encoder_path == "padded":
                x = unpad(x, mb.enc.cu_seqlens, mb.enc.total)  # [total_enc, enc_dim]
                maps = [unpad(m, mb.enc.cu_seqlens, mb.enc.total) for m in maps]
            encoded[name] = EncodedModality(out=x, layers=maps if cfg.use_weighted_fm else [])
        return encoded

    def _joint_memory(self, batch: PackedBatch, encoded: dict[str, EncodedModality]):
        """Every modality's encoder rows, per sample: (rows ``[total_mem, enc_dim]``, feature maps)."""
        order = batch.memory_order
        rows = torch.cat([encoded[n].out for n in self.names])[order]  # [total_mem, enc_dim]
        n_maps = len(encoded[self.names[0]].layers)
        maps = [torch.cat([encoded[n].layers[i] for n in self.names])[order] for i in range(n_maps)]
        return rows, maps

    # -- decoder ---------------------------------------------------------------------------
    def _queries(self, decoder: ModalityDecoder, name: str, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return decoder.mask_token + decoder.modality_token + self._position(name, t, p, "dec")  # [n, dec_dim]

    def _decode_cross(self, decoder, mb: ModalityBatch, memories: list[torch.Tensor], mem: Packed):
        path, backend = self.decoder_path, self.cfg.attn_backend
        x = self._queries(decoder, mb.name, mb.pred_t, mb.pred_p)  # [total_pred, dec_dim]
        if path != "packed":
            x = _pad(x, mb.pred)  # [B, Lq, dec_dim]
            memories = [_pad(m, mem) for m in memories]  # [B, Lk, dec_dim] each
        cross = _layout(path, mb.pred, mem, backend)
        self_layout = _layout(path, mb.pred, mb.pred, backend)
        for block, memory in zip(decoder.blocks, memories):
            x = block(x, memory, cross, self_layout)
        if path != "packed":
            x = unpad(x, mb.pred.cu_seqlens, mb.pred.total)  # [total_pred, dec_dim]
        return x

    def _decode_standard(self, decoder, mb: ModalityBatch, memory: torch.Tensor):
        """The standard MAE decoder: self-attention over the memory and every masked position."""
        path = self.decoder_path
        queries = self._queries(decoder, mb.name, mb.masked_t, mb.masked_p)  # [total_masked, dec_dim]
        x = torch.cat([memory, queries])[mb.mae_order]  # [total_seq, dec_dim]
        if path != "packed":
            x = _pad(x, mb.mae)  # [B, L, dec_dim]
        layout = _layout(path, mb.mae, mb.mae, self.cfg.attn_backend)
        for block in decoder.blocks:
            x = block(x, layout)
        if path != "packed":
            x = unpad(x, mb.mae.cu_seqlens, mb.mae.total)
        return x[mb.mae_query_rows][mb.pred_in_masked]  # [total_pred, dec_dim]

    def forward_decoder(self, batch: PackedBatch, encoded: dict[str, EncodedModality]) -> dict[str, torch.Tensor]:
        """Reconstruct each modality's predicted tokens → ``[total_pred, token_dim]`` per modality."""
        predictions = {}
        joint = self._joint_memory(batch, encoded) if self.cfg.memory == "joint" else None
        for name in self.names:
            decoder = self.decoders[name]
            mb = batch.modalities[name]
            if joint is not None:
                (rows, maps), mem = joint, batch.memory
            else:
                rows, maps, mem = encoded[name].out, encoded[name].layers, mb.enc
            memories = decoder.memories(rows, maps)
            if self.cfg.use_cross_attn:
                x = self._decode_cross(decoder, mb, memories, mem)
            else:
                x = self._decode_standard(decoder, mb, memories[0])
            predictions[name] = decoder.head(decoder.norm(x))
        return predictions

    # -- loss --------------------------------------------------------------------------------
    def forward_loss(self, batch: PackedBatch, predictions: dict[str, torch.Tensor],
                     normalizers: dict[str, float] | None = None):
        """Masked MSE per modality over the predicted tokens' counted values.

        ``normalizers[m]`` divides modality m's sum of squared errors (default: its number of
        counted values in this batch; data-parallel training passes the global count / world).
        Returns (loss, losses, sse).
        """
        losses, sse_all = {}, {}
        total = None
        for name, pred in predictions.items():
            mb = batch.modalities[name]
            target, weight = mb.target, mb.target_weight  # [total_pred, token_dim] each
            if self.cfg.norm_pix_loss:
                count = weight.sum(-1, keepdim=True).clamp_min(1.0)
                mean = (target * weight).sum(-1, keepdim=True) / count
                var = ((target - mean).square() * weight).sum(-1, keepdim=True) / count
                target = (target - mean) / (var + 1e-6).sqrt()
            sse = masked_sse(pred, target, weight, fused=self.decoder_path == "packed")
            norm = mb.target_count if normalizers is None else normalizers[name]
            loss = sse / norm if norm > 0 else sse * 0.0
            weighted = loss * self.cfg.loss_weights.get(name, 1.0)
            total = weighted if total is None else total + weighted
            losses[name], sse_all[name] = loss, sse
        return total, losses, sse_all

    def forward(self, batch: PackedBatch, normalizers: dict[str, float] | None = None) -> ModelOutput:
        encoded = self.forward_encoder(batch)
        predictions = self.forward_decoder(batch, encoded)
        loss, losses, sse = self.forward_loss(batch, predictions, normalizers)
        return ModelOutput(loss=loss, losses=losses, sse=sse, predictions=predictions)
