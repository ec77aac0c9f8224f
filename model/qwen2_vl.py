"""Qwen2-VL as plain single-device modules: ViT + merger + Qwen2 decoder with M-RoPE, on packed input.

Shape legend: T = packed tokens (several samples back to back), D = LLM width, H = query heads,
Hkv = kv heads, Dh = head dim, N = ViT patches, M = merged vision tokens, V = vocab, S = tokens held in a KV cache.

Pipeline-friendly (torchtitan style): decoder layers live in a ModuleDict keyed by their global index; the
top modules (visual, embed_tokens, norm, lm_head) may be set to None by a pipeline split, and a later stage's
forward takes hidden states instead of ids. The forward is a loop over whatever layers remain and returns hidden states;
the loss is composed outside the model (model.loss.lm_loss over `lm_head.weight`, or the engine's
vocab-parallel version), and HF checkpoints are read and written by model.hf_adapter.

The inputs (one packed microbatch, see core/batch.py for the producer's contract):
  input_ids (T,) int64, position_ids (3, T) int64, cu_seqlens (S+1,) int32, max_seqlen int,
  pixel_values (N_img, 1176) + image_grid_thw (I, 3), pixel_values_videos (N_vid, 1176) + video_grid_thw (K, 3).

Inference (model/generate.py) adds one optional input, `kv_cache` (a KVCache): the forward then runs ONE sequence,
appends every layer's keys and values to the cache, and attends over everything cached so far. Training never
passes it, and the layers are then called exactly as without it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.attention import varlen_attention
from model.config import ModelConfig, TextConfig
from model.vision import Recompute, VisionTransformer, normalize_pixel_rows, rotate_half, run_block


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, then back to the input dtype before the weight (as Qwen2). F.rms_norm without a weight
        # is exactly that normalization (half inputs are upcast inside) in one fused kernel where torch has one;
        # the weight is applied after the cast, so the result is bitwise the unfused formula's.
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


class MRotary(nn.Module):
    """Multimodal rotary embedding: the head_dim/2 frequencies are split into (temporal, height, width)
    sections; section i reads its angle from position stream i."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dim, self.theta = cfg.head_dim, cfg.rope_theta
        self.register_buffer("inv_freq", self.fresh_inv_freq(), persistent=False)
        self.section = list(cfg.mrope_section)

    def fresh_inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        # Computed on the CPU in fp32 exactly as transformers does, then moved: bit-identical angles.
        inv = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float, device="cpu") / self.dim))
        return inv.to(device if device is not None else torch.get_default_device())

    def forward(self, position_ids_3T: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:
            # model.to(bf16) casts buffers too; bf16 frequencies would shift every angle, so rebuild fp32 ones.
            inv_freq = self.fresh_inv_freq(inv_freq.device)
        freqs_3TF = position_ids_3T.to(inv_freq.device, torch.float)[..., None] * inv_freq
        freqs_TF = torch.cat([chunk[i % 3] for i, chunk in enumerate(freqs_3TF.split(self.section, dim=-1))], dim=-1)
        emb_TDh = torch.cat([freqs_TF, freqs_TF], dim=-1)
        return emb_TDh.cos().to(dtype), emb_TDh.sin().to(dtype)


class KVCache:
    """Keys and values of every decoder layer for ONE sequence being generated (inference only).

    Buffers of `capacity` tokens are allocated per layer on first use (no re-allocation while decoding);
    `Qwen2VL.forward(..., kv_cache=cache)` writes the new tokens' keys/values of each layer at `length` and then
    advances `length` by the number of tokens it ran."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"KVCache capacity={capacity}: must be >= 1 token")
        self.capacity = capacity
        self.length = 0
        self._k: dict[str, torch.Tensor] = {}
        self._v: dict[str, torch.Tensor] = {}

    def append(self, layer: str, k_THkvDh: torch.Tensor, v_THkvDh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer `layer`'s keys/values of the T new tokens; return all S = length + T cached ones."""
        end = self.length + k_THkvDh.shape[0]
        if end > self.capacity:
            raise ValueError(f"KVCache holds {self.capacity} tokens; {self.length} cached + {k_THkvDh.shape[0]} new "
                             "do not fit (size it as prompt length + max_new_tokens)")
        if layer not in self._k:
            shape = (self.capacity, *k_THkvDh.shape[1:])
            self._k[layer] = k_THkvDh.new_empty(shape)
            self._v[layer] = v_THkvDh.new_empty(shape)
        k_SHkvDh, v_SHkvDh = self._k[layer], self._v[layer]
        k_SHkvDh[self.length : end] = k_THkvDh
        v_SHkvDh[self.length : end] = v_THkvDh
        return k_SHkvDh[:end], v_SHkvDh[:end]

    def advance(self, n: int) -> None:
        self.length += n


def cached_attention(q_THDh: torch.Tensor, k_SHkvDh: torch.Tensor, v_SHkvDh: torch.Tensor) -> torch.Tensor:
    """Attention of the T newest tokens over all S cached ones (the T newest are the last T): new token i sees
    keys 0 .. S - T + i. One SDPA call; a single new token (decoding) needs no mask."""
    T, S = q_THDh.shape[0], k_SHkvDh.shape[0]
    q_1HTD, k_1HSD, v_1HSD = (x.transpose(0, 1).unsqueeze(0) for x in (q_THDh, k_SHkvDh, v_SHkvDh))
    mask_TS = None
    if T > 1:
        keys_S = torch.arange(S, device=q_THDh.device)
        mask_TS = keys_S[None, :] <= torch.arange(S - T, S, device=q_THDh.device)[:, None]
    o_1HTD = F.scaled_dot_product_attention(q_1HTD, k_1HSD, v_1HSD, attn_mask=mask_TS,
                                            enable_gqa=q_1HTD.shape[1] != k_1HSD.shape[1])
    return o_1HTD.squeeze(0).transpose(0, 1)


def apply_rope(x_THDh: torch.Tensor, cos_TDh: torch.Tensor, sin_TDh: torch.Tensor) -> torch.Tensor:
    return x_THDh * cos_TDh[:, None, :] + rotate_half(x_THDh) * sin_TDh[:, None, :]


class Attention(nn.Module):
    """Causal GQA with qkv bias; attention stays within each packed sample (cu_seqlens)."""

    def __init__(self, cfg: TextConfig, backend: str) -> None:
        super().__init__()
        self.head_dim, self.backend = cfg.head_dim, backend
        D, Dh = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(D, cfg.num_heads * Dh, bias=True)
        self.k_proj = nn.Linear(D, cfg.num_kv_heads * Dh, bias=True)
        self.v_proj = nn.Linear(D, cfg.num_kv_heads * Dh, bias=True)
        self.o_proj = nn.Linear(cfg.num_heads * Dh, D, bias=False)

    def forward(self, x_TD, rope, cu_seqlens, max_seqlen: int, kv_cache: KVCache | None = None,
                layer: str = "") -> torch.Tensor:
        T = x_TD.shape[0]
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q_THDh = apply_rope(self.q_proj(x_TD).view(T, -1, self.head_dim), *rope)
        k_THDh = apply_rope(self.k_proj(x_TD).view(T, -1, self.head_dim), *rope)
        v_THDh = self.v_proj(x_TD).view(T, -1, self.head_dim)
        if kv_cache is not None and kv_cache.length > 0:
            k_SHkvDh, v_SHkvDh = kv_cache.append(layer, k_THDh, v_THDh)
            o_THDh = cached_attention(q_THDh, k_SHkvDh, v_SHkvDh)
        else:
            if kv_cache is not None:  # prefill: the training kernel, so the prompt's logits equal a plain forward
                kv_cache.append(layer, k_THDh, v_THDh)
            o_THDh = varlen_attention(q_THDh, k_THDh, v_THDh, cu_seqlens, max_seqlen, causal=True,
                                      backend=self.backend)
        return self.o_proj(o_THDh.reshape(T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, backend: str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.recompute: Recompute | None = None
        """Activation checkpointing of this layer (set by parallel/checkpointing.py): recompute(body, *args)
        runs the layer's computation so that its activations are recomputed in backward. It wraps the body
        only, never the module call, so the hooks of tensor and data parallelism run once per call, outside the
        recomputed region (their ops would otherwise replay in backward)."""

    def forward(self, x_TD, rope, cu_seqlens, max_seqlen: int, kv_cache: KVCache | None = None,
                layer: str = "") -> torch.Tensor:
        if kv_cache is None:
            return run_block(self.recompute, self._body, x_TD, rope, cu_seqlens, max_seqlen)
        return self._body(x_TD, rope, cu_seqlens, max_seqlen, kv_cache, layer)

    def _body(self, x_TD, rope, cu_seqlens, max_seqlen: int, kv_cache: KVCache | None = None,
              layer: str = "") -> torch.Tensor:
        xn_TD = self.input_layernorm(x_TD)
        # NOTE: the cache goes by keyword and only when given: tensor parallelism's PrepareModuleInput hooks
        # match the 4 positional inputs of a training call.
        if kv_cache is None:
            x_TD = x_TD + self.self_attn(xn_TD, rope, cu_seqlens, max_seqlen)
        else:
            x_TD = x_TD + self.self_attn(xn_TD, rope, cu_seqlens, max_seqlen, kv_cache=kv_cache, layer=layer)
        return x_TD + self.mlp(self.post_attention_layernorm(x_TD))


class Qwen2VL(nn.Module):
    """The whole model (or, after a pipeline split, one stage of it)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        t = cfg.text
        self.visual: VisionTransformer | None = VisionTransformer(cfg)
        self.embed_tokens: nn.Embedding | None = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(t, cfg.attn_backend) for i in range(t.num_layers)})
        self.norm: RMSNorm | None = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.lm_head: nn.Linear | None = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        if t.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = MRotary(t)
        self.init_weights()

    # ------------------------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Qwen2-style init: normal(0, std) for linear/conv/embedding weights, zero biases, unit norms."""
        for m in self.modules():
            if any(p.is_meta for p in m.parameters(recurse=False)):
                continue  # nothing to initialize on the meta device (and meta normal_ is slow at 72B)
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the rotary frequency buffers (non-persistent, so neither checkpoints nor `to_empty`
        carry them) on `device` (default: where they are now), in fp32."""
        rotaries = [self.rotary] + ([self.visual.rotary] if self.visual is not None else [])
        for rot in rotaries:
            rot.inv_freq = rot.fresh_inv_freq(device if device is not None else rot.inv_freq.device)

    # ------------------------------------------------------------------------------------ embedding
    def _dummy_vision(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A 1-frame-pair, 2x2-patch blank image: the smallest input the ViT + merger accept."""
        m = self.cfg.vision.spatial_merge_size
        grid = torch.tensor([[1, m, m]])
        pixels = torch.zeros(m * m, self.cfg.vision.patch_dim, device=device)
        return pixels, grid

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with vision embeddings scattered into the image/video pad positions.

        NOTE: images and videos go through ONE ViT call (their segments never mix). When the microbatch has
        no vision input, a blank 2x2 image runs instead and is added with weight zero, so every rank runs the
        same vision graph and the vision parameters always get a (zero) gradient: no data-parallel rank waits
        on a collective that another rank skipped.
        """
        assert self.embed_tokens is not None, "embed() runs on the first pipeline stage only"
        ids_T = input_ids.reshape(-1)
        h_TD = self.embed_tokens(ids_T)
        if self.visual is None:
            return h_TD
        pix, grids, n_img_rows = [], [], 0
        vcfg = self.cfg.vision
        if pixel_values is not None and pixel_values.numel():
            pix.append(normalize_pixel_rows(pixel_values, vcfg))
            grids.append(image_grid_thw.reshape(-1, 3))
            n_img_rows = pixel_values.shape[0]
        if pixel_values_videos is not None and pixel_values_videos.numel():
            pix.append(normalize_pixel_rows(pixel_values_videos, vcfg))
            grids.append(video_grid_thw.reshape(-1, 3))
        if not pix:
            n_pads = torch.stack([(ids_T == self.cfg.image_token_id).sum(), (ids_T == self.cfg.video_token_id).sum()])
            n_img, n_vid = n_pads.tolist()
            if n_img or n_vid:
                raise ValueError(
                    f"input_ids hold {n_img} <|image_pad|> and {n_vid} <|video_pad|> tokens but no pixel_values / "
                    "pixel_values_videos were given (0 embeddings from the ViT)"
                )
            dummy_pix, dummy_grid = self._dummy_vision(h_TD.device)
            v_MD = self.visual(dummy_pix.to(h_TD.dtype), dummy_grid)
            return h_TD + 0.0 * v_MD.sum().to(h_TD.dtype)
        v_MD = self.visual(torch.cat(pix).to(h_TD.dtype), torch.cat(grids).cpu())
        merge = self.cfg.vision.spatial_merge_size ** 2
        n_img_tok = n_img_rows // merge
        masks = [ids_T == self.cfg.image_token_id, ids_T == self.cfg.video_token_id]
        counts = torch.stack([m.sum() for m in masks]).tolist()  # one host read for both checks
        for mask_T, n_pad, emb_MD, kind in (
            (masks[0], counts[0], v_MD[:n_img_tok], "image"),
            (masks[1], counts[1], v_MD[n_img_tok:], "video"),
        ):
            if n_pad != emb_MD.shape[0]:
                raise ValueError(
                    f"{kind} placeholders and {kind} embeddings differ: {n_pad} <|{kind}_pad|> tokens in input_ids, "
                    f"{emb_MD.shape[0]} embeddings from the ViT (grid_thw product / {merge})"
                )
            if n_pad:
                h_TD = h_TD.masked_scatter(mask_T[:, None], emb_MD.to(h_TD.dtype))
        return h_TD

    # ------------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """One packed microbatch through the modules this (stage of the) model holds: the hidden states (T, D),
        normalized when this stage holds the final norm. Stage 0 takes ids (and pixels); later stages take the
        previous stage's `hidden_states`.

        With `kv_cache` (inference, model/generate.py): one sequence, whose new tokens attend to everything the
        cache holds; continuing a cached sequence needs explicit `position_ids` (generated tokens continue after
        the prompt's highest M-RoPE id, not after its length)."""
        if hidden_states is None:
            if self.embed_tokens is None:
                raise ValueError("a stage without embed_tokens needs hidden_states from the previous stage")
            h_TD = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        else:
            h_TD = hidden_states
        T = h_TD.shape[0]
        if kv_cache is not None:
            if cu_seqlens is not None and cu_seqlens.numel() != 2:
                raise ValueError(f"a KV cache holds one sequence; got cu_seqlens with {cu_seqlens.numel() - 1}")
            if position_ids is None and kv_cache.length > 0:
                raise ValueError(f"continuing a KV cache of {kv_cache.length} tokens needs explicit position_ids")
        if position_ids is None:
            position_ids = torch.arange(T, device=h_TD.device).expand(3, -1)
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, T], dtype=torch.int32, device=h_TD.device)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        rope = self.rotary(position_ids.reshape(3, -1), h_TD.dtype)
        if kv_cache is None:
            for layer in self.layers.values():
                h_TD = layer(h_TD, rope, cu_seqlens, max_seqlen)
        else:
            for name, layer in self.layers.items():
                h_TD = layer(h_TD, rope, cu_seqlens, max_seqlen, kv_cache=kv_cache, layer=name)
            kv_cache.advance(T)
        if self.norm is not None:
            h_TD = self.norm(h_TD)
        return h_TD

    def logits(self, h_TD: torch.Tensor) -> torch.Tensor:
        """Full logits (T, V): for parity checks and inference, never in training."""
        assert self.lm_head is not None
        return self.lm_head(h_TD)
