"""The Qwen2-VL vision encoder: Conv3d patch embedding, 2D-RoPE ViT blocks, 2x2 patch merger.

Shape legend: N = patches (rows of pixel_values, all images/videos of the batch), C = ViT width,
H = heads, Dh = head dim, P = pixel row length (3 * 2 * 14 * 14 = 1176), M = merged tokens (N / 4),
D = LLM width.

pixel_values rows arrive in the processor's order: per image/video, per frame pair t, per 2x2 merge
window (row-major over the merged grid), the 4 patches of that window. So the merger can view every 4
consecutive rows as one LLM token, and the ViT's attention segments are the frame pairs
(grid_h * grid_w rows each).

Rows come either processor-normalized (float, P wide, as transformers' processor returns them) or RAW: uint8
RGB values in the same row order, P wide for videos and C*14*14 = 588 wide for images (one frame: the
processor's temporal copy of an image is implied). Raw rows are what our loader ships, a quarter (images: an
eighth) of the bytes through worker queues and host-to-device copies; normalize_pixel_rows() turns them into
the processor's values on the device, where it costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.attention import varlen_attention
from model.config import ModelConfig, VisionConfig

# The processor's rescale + normalization (OpenAI CLIP mean / std, Qwen2-VL's preprocessor_config.json).
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_pixel_rows(rows: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """Pixel rows -> the processor's float rows (N, P). Float rows pass through unchanged; raw uint8 rows are
    rescaled by 1/255 and CLIP-normalized per channel (folded into one multiply-add: v * a + b), and 588-wide
    image rows get their temporal copy. Equal to the processor's values to float32 rounding (< 1e-6)."""
    if rows.dtype != torch.uint8:
        return rows
    C, T, q = cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size * cfg.patch_size
    N, width = rows.shape
    if width not in (C * q, C * T * q):
        raise ValueError(f"raw pixel rows are {width} wide; expected {C * q} (image frame) or {C * T * q} (video)")
    std = torch.tensor(PIXEL_STD, dtype=torch.float32, device=rows.device).view(1, C, 1)
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32, device=rows.device).view(1, C, 1)
    x_NCK = rows.view(N, C, -1).float() * (1.0 / (255.0 * std)) - mean / std
    if width == C * q:
        x_NCK = x_NCK.unsqueeze(2).expand(N, C, T, q)
    return x_NCK.reshape(N, C * T * q)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def vision_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """ViT attention segments: every frame pair of every image/video is its own segment (h*w rows)."""
    hw = grid_thw[:, 1] * grid_thw[:, 2]
    seg = torch.repeat_interleave(hw, grid_thw[:, 0])
    return F.pad(seg.cumsum(0, dtype=torch.int32), (1, 0))


def vision_rope_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """pos_N2: (row, col) of every patch, in the merge-window order of pixel_values."""
    out = []
    for t, h, w in grid_thw.tolist():
        hpos = torch.arange(h).unsqueeze(1).expand(-1, w)
        wpos = torch.arange(w).unsqueeze(0).expand(h, -1)
        # (h, w) -> (h/m, m, w/m, m) -> (h/m, w/m, m, m): the processor's window-major order.
        hpos = hpos.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).flatten()
        wpos = wpos.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).flatten()
        out.append(torch.stack([hpos, wpos], dim=-1).repeat(t, 1))
    return torch.cat(out, dim=0)


class VisionRotary(nn.Module):
    """2D rotary embedding: head_dim/2 frequencies for rows and head_dim/2 for columns."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.dim, self.theta = cfg.head_dim // 2, cfg.rope_theta
        self.register_buffer("inv_freq", self.fresh_inv_freq(), persistent=False)

    def fresh_inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        inv = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float, device="cpu") / self.dim))
        return inv.to(device if device is not None else torch.get_default_device())

    def forward(self, pos_N2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:  # see MRotary.forward
            inv_freq = self.fresh_inv_freq(inv_freq.device)
        freqs_N2F = pos_N2.to(inv_freq.device, torch.float)[..., None] * inv_freq
        freqs_NF = freqs_N2F.flatten(1)  # (N, head_dim/2): row freqs then column freqs
        emb_NDh = torch.cat([freqs_NF, freqs_NF], dim=-1)
        return emb_NDh.cos(), emb_NDh.sin()


def apply_vision_rope(x_NHDh: torch.Tensor, cos_NDh: torch.Tensor, sin_NDh: torch.Tensor) -> torch.Tensor:
    # fp32 rotation, as the reference, then back to the activation dtype.
    xf = x_NHDh.float()
    out = xf * cos_NDh[:, None, :] + rotate_half(xf) * sin_NDh[:, None, :]
    return out.to(x_NHDh.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel_size=k, stride=k, bias=False)

    def forward(self, pixels_NP: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        x = pixels_NP.view(-1, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
        return self.proj(x.to(self.proj.weight.dtype)).view(-1, c.embed_dim)


class VisionAttention(nn.Module):
    """Bidirectional attention within each frame pair. q/k/v are separate projections (the HF checkpoint's
    fused `qkv` is split by the adapter) so tensor parallelism can shard them column-wise directly."""

    def __init__(self, cfg: VisionConfig, backend: str) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.backend = cfg.num_heads, cfg.head_dim, backend
        self.q_proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=True)
        self.k_proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=True)
        self.v_proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=True)
        self.o_proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=True)

    def forward(self, x_NC, cu_seqlens, max_seqlen: int, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        N = x_NC.shape[0]
        # -1 heads: under tensor parallelism each rank holds num_heads / tp of them.
        q_NHDh = self.q_proj(x_NC).view(N, -1, self.head_dim)
        k_NHDh = self.k_proj(x_NC).view(N, -1, self.head_dim)
        v_NHDh = self.v_proj(x_NC).view(N, -1, self.head_dim)
        q_NHDh, k_NHDh = apply_vision_rope(q_NHDh, *rope), apply_vision_rope(k_NHDh, *rope)
        o_NHDh = varlen_attention(q_NHDh, k_NHDh, v_NHDh, cu_seqlens, max_seqlen, causal=False, backend=self.backend)
        return self.o_proj(o_NHDh.reshape(N, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.hidden_act != "quick_gelu":
            raise ValueError(f"vision.hidden_act={cfg.hidden_act!r}; Qwen2-VL's ViT uses 'quick_gelu'")
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


Recompute = Callable[..., torch.Tensor]
"""recompute(body, *args) -> body(*args), recomputing body's activations in backward (activation checkpointing)."""


def run_block(recompute: Recompute | None, body: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """body(*args), through the block's activation-checkpointing function when one is set."""
    return body(*args) if recompute is None else recompute(body, *args)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, backend: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg, backend)
        self.mlp = VisionMLP(cfg)
        self.recompute: Recompute | None = None
        """Activation checkpointing of this block (set by parallel/checkpointing.py); see DecoderLayer.recompute."""

    def forward(self, x_NC, cu_seqlens, max_seqlen: int, rope) -> torch.Tensor:
        return run_block(self.recompute, self._body, x_NC, cu_seqlens, max_seqlen, rope)

    def _body(self, x_NC, cu_seqlens, max_seqlen: int, rope) -> torch.Tensor:
        x_NC = x_NC + self.attn(self.norm1(x_NC), cu_seqlens, max_seqlen, rope)
        return x_NC + self.mlp(self.norm2(x_NC))


class PatchMerger(nn.Module):
    """LayerNorm, then a 2-layer MLP over each 2x2 window's concatenated features (4C -> 4C -> D)."""

    def __init__(self, cfg: VisionConfig, out_dim: int) -> None:
        super().__init__()
        self.window_dim = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        # Sequential keeps the checkpoint's names (mlp.0 / mlp.2).
        self.mlp = nn.Sequential(
            nn.Linear(self.window_dim, self.window_dim), nn.GELU(), nn.Linear(self.window_dim, out_dim)
        )

    def forward(self, x_NC: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x_NC).view(-1, self.window_dim))


class VisionTransformer(nn.Module):
    """ViT + merger. `blocks` is a ModuleDict so names survive pipeline pruning and DCP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        v = cfg.vision
        self.cfg = v
        self.patch_embed = PatchEmbed(v)
        self.rotary = VisionRotary(v)
        self.blocks = nn.ModuleDict({str(i): VisionBlock(v, cfg.attn_backend) for i in range(v.depth)})
        self.merger = PatchMerger(v, cfg.text.hidden_size)

    def forward(self, pixels_NP: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Returns merged tokens (M, D), M = N / 4, in pixel_values order."""
        grid_thw = grid_thw.to("cpu", torch.long)
        cu_seqlens = vision_cu_seqlens(grid_thw).to(pixels_NP.device)
        max_seqlen = int((grid_thw[:, 1] * grid_thw[:, 2]).max())
        rope = self.rotary(vision_rope_positions(grid_thw, self.cfg.spatial_merge_size))
        x_NC = self.patch_embed(pixels_NP)
        for blk in self.blocks.values():
            x_NC = blk(x_NC, cu_seqlens, max_seqlen, rope)
        return self.merger(x_NC)
