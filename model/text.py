"""The decoder of every family: Qwen2 (Qwen2-VL, Qwen2.5-VL) and Qwen3 (Qwen3-VL: QK-norm, no qkv bias,
interleaved M-RoPE), with a KV cache for inference.

Shape legend: T = packed tokens (several samples back to back), D = LLM width, H = query heads,
Hkv = kv heads, Dh = head dim, F = rotary frequencies (Dh / 2), S = tokens held in a KV cache.

Decoder layers take one packed microbatch's hidden states with its rotary angles and segment boundaries
(cu_seqlens): attention stays within each sample. Inference (model/generate.py) passes a KVCache: the layer then
runs ONE sequence, appends its keys and values to the cache and attends over everything cached so far; training
never passes it, and the layers are then called exactly as without it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.attention import sdpa_heads, varlen_attention
from model.config import TextConfig
from model.vision import GatedMLP, Recompute, rotate_half, run_block


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


def mrope_streams(section: tuple[int, int, int], interleaved: bool) -> list[int]:
    """For each of the head_dim/2 rotary frequencies, the position stream (0 = t, 1 = h, 2 = w) it reads.

    Chunked (Qwen2-VL, Qwen2.5-VL): three contiguous sections. Interleaved (Qwen3-VL): t, h, w, t, h, w, ... while
    the h and w streams last (3 x section[1], 3 x section[2] frequencies), then t for the rest."""
    t, h, w = section
    if not interleaved:
        return [0] * t + [1] * h + [2] * w
    out = [0] * (t + h + w)
    for j in range(len(out)):
        if j % 3 == 1 and j < 3 * h:
            out[j] = 1
        elif j % 3 == 2 and j < 3 * w:
            out[j] = 2
    return out


class MRotary(nn.Module):
    """Multimodal rotary embedding: each of the head_dim/2 frequencies reads its angle from one of the three
    position streams (temporal, height, width), in sections or interleaved (mrope_streams)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dim, self.theta = cfg.head_dim, cfg.rope_theta
        self.register_buffer("inv_freq", self.fresh_inv_freq(), persistent=False)
        self.streams = mrope_streams(tuple(cfg.mrope_section), cfg.mrope_interleaved)
        # The stream of each frequency, a device buffer: a host list would be copied to the device every forward.
        self.register_buffer("stream_of_freq", self.fresh_streams(), persistent=False)

    def fresh_streams(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.tensor(self.streams, device=device if device is not None else torch.get_default_device())

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
        # Pick each frequency's stream: an exact selection, no arithmetic.
        streams_F = self.stream_of_freq
        freqs_TF = freqs_3TF.gather(0, streams_F.expand(1, freqs_3TF.shape[1], -1)).squeeze(0)
        emb_TDh = torch.cat([freqs_TF, freqs_TF], dim=-1)
        return emb_TDh.cos().to(dtype), emb_TDh.sin().to(dtype)


class KVCache:
    """Keys and values of every decoder layer for ONE sequence being generated (inference only).

    Buffers of `capacity` tokens are allocated per layer on first use (no re-allocation while decoding);
    `VLModel.forward(..., kv_cache=cache)` writes the new tokens' keys/values of each layer at `length` and then
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
    mask_TS = None
    if T > 1:
        keys_S = torch.arange(S, device=q_THDh.device)
        mask_TS = keys_S[None, :] <= torch.arange(S - T, S, device=q_THDh.device)[:, None]
    return sdpa_heads(q_THDh, k_SHkvDh, v_SHkvDh, False, None, mask_TS)


def apply_rope(x_THDh: torch.Tensor, cos_TDh: torch.Tensor, sin_TDh: torch.Tensor) -> torch.Tensor:
    return x_THDh * cos_TDh[:, None, :] + rotate_half(x_THDh) * sin_TDh[:, None, :]


class Attention(nn.Module):
    """Causal GQA (qkv bias in Qwen2; per-head RMSNorm of q and k in Qwen3); attention stays within each packed
    sample (cu_seqlens)."""

    def __init__(self, cfg: TextConfig, backend: str) -> None:
        super().__init__()
        self.head_dim, self.backend = cfg.head_dim, backend
        D, Dh = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(D, cfg.num_heads * Dh, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, cfg.num_kv_heads * Dh, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, cfg.num_kv_heads * Dh, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * Dh, D, bias=False)
        self.q_norm = RMSNorm(Dh, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(Dh, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x_TD, rope, cu_seqlens, max_seqlen: int, kv_cache: KVCache | None = None,
                layer: str = "") -> torch.Tensor:
        T = x_TD.shape[0]
        # -1 heads: under tensor parallelism each rank holds a slice of the heads.
        q_THDh = self.q_proj(x_TD).view(T, -1, self.head_dim)
        k_THDh = self.k_proj(x_TD).view(T, -1, self.head_dim)
        if self.q_norm is not None:
            q_THDh, k_THDh = self.q_norm(q_THDh), self.k_norm(k_THDh)
        q_THDh, k_THDh = apply_rope(q_THDh, *rope), apply_rope(k_THDh, *rope)
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


class DecoderLayer(nn.Module):
    SEQUENCE_KWARGS = ("deepstack",)
    """Keyword inputs aligned with the whole sequence (T rows): sequence parallelism shards them like the hidden
    states (parallel/tensor_parallel.py)."""

    def __init__(self, cfg: TextConfig, backend: str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.recompute: Recompute | None = None
        """Activation checkpointing of this layer (set by parallel/checkpointing.py): recompute(body, *args)
        runs the layer's computation so that its activations are recomputed in backward. It wraps the body
        only, never the module call, so the hooks of tensor and data parallelism run once per call, outside the
        recomputed region (their ops would otherwise replay in backward)."""

    def forward(self, x_TD, rope, cu_seqlens, max_seqlen: int, kv_cache: KVCache | None = None,
                layer: str = "", deepstack: torch.Tensor | None = None) -> torch.Tensor:
        """deepstack (T, D): Qwen3-VL's vision features of this layer, zero outside the visual positions, added to
        the layer's output (the only keyword a training call may pass: tensor parallelism slices it like the
        hidden states, parallel/tensor_parallel.py)."""
        if kv_cache is None:
            out_TD = run_block(self.recompute, self._body, x_TD, rope, cu_seqlens, max_seqlen)
        else:
            out_TD = self._body(x_TD, rope, cu_seqlens, max_seqlen, kv_cache, layer)
        return out_TD if deepstack is None else out_TD + deepstack

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
