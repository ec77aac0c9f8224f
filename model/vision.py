"""The vision tower every family shares: patch embedding, 2D-RoPE ViT blocks, the patch merger; the parts a family
swaps (norms, MLP, merger, window attention, a learned position table, DeepStack) plug into VisionTower.

Shape legend: N = patches (rows of pixel_values, all images/videos of the batch), C = ViT width,
H = heads, Dh = head dim, P = pixel row length (3 * 2 * p * p at patch size p: 1176 at 14, 1536 at 16),
M = merged tokens (N / 4), D = LLM width, K = DeepStack levels.

pixel_values rows arrive in the processor's order: per image/video, per frame pair t, per 2x2 merge
window (row-major over the merged grid), the 4 patches of that window. So the merger can view every 4
consecutive rows as one LLM token, and the ViT's attention segments are the frame pairs
(grid_h * grid_w rows each).

Rows come either processor-normalized (float, P wide, as transformers' processor returns them) or RAW: uint8
RGB values in the same row order, P wide for videos and P / 2 wide for images (one frame: the processor's
temporal copy of an image is implied). Raw rows are what our loader ships, a quarter (images: an eighth) of the
bytes through worker queues and host-to-device copies; normalize_pixel_rows() turns them into the processor's
values on the device, where it costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_map_only

from model.attention import varlen_attention
from model.config import ModelConfig, VisionConfig
from model.processing import VisionProcessing


def pixel_affine(proc: VisionProcessing, device: torch.device | str | None = None) -> torch.Tensor:
    """(2, 3) fp32: per channel the scale a = 1 / (255 std) and the offset b = mean / std of the family's
    normalization, v * a - b (what normalize_pixel_rows applies)."""
    std = torch.tensor(proc.pixel_std, dtype=torch.float32, device="cpu")
    mean = torch.tensor(proc.pixel_mean, dtype=torch.float32, device="cpu")
    return torch.stack([1.0 / (255.0 * std), mean / std]).to(device if device is not None
                                                             else torch.get_default_device())


def normalize_pixel_rows(rows: torch.Tensor, proc: VisionProcessing, affine: torch.Tensor | None = None,
                         ) -> torch.Tensor:
    """Pixel rows -> the processor's float rows (N, P). Float rows pass through unchanged; raw uint8 rows are
    rescaled by 1/255 and normalized per channel with the family's mean / std (folded into one multiply-add:
    v * a - b), and single-frame image rows get their temporal copy. Equal to the processor's values to float32
    rounding (< 1e-6). `affine`: pixel_affine(proc) already on the rows' device (the model's buffer), else it is
    built here."""
    if rows.dtype != torch.uint8:
        return rows
    C, T, q = 3, proc.temporal_patch_size, proc.patch_size * proc.patch_size
    N, width = rows.shape
    if width not in (C * q, C * T * q):
        raise ValueError(f"raw pixel rows are {width} wide; expected {C * q} (image frame) or {C * T * q} (video) "
                         f"for {proc.family}'s {proc.patch_size}-pixel patches")
    a_C, b_C = (affine if affine is not None else pixel_affine(proc, rows.device)).unbind(0)
    x_NCK = rows.view(N, C, -1).float() * a_C.view(1, C, 1) - b_C.view(1, C, 1)
    if width == C * q:
        x_NCK = x_NCK.unsqueeze(2).expand(N, C, T, q)
    return x_NCK.reshape(N, C * T * q)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"vision.hidden_act={name!r} is not implemented; choose one of "
                         f"{sorted(ACTIVATIONS)}") from None


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
    """The Conv3d patch embedding (its weight is stored as the checkpoint's Conv3d, kernel = stride = one patch),
    computed as one matmul over the flattened pixel rows: the same numbers (to fp32 rounding) without a Conv3d
    kernel on tiny kernels."""

    def __init__(self, cfg: VisionConfig, bias: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel_size=k, stride=k, bias=bias)

    def forward(self, pixels_NP: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        # Row layout (C, T, P, P) is the Conv3d weight's (C_in, kT, kH, kW): a row is exactly one receptive field.
        return F.linear(pixels_NP.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


class VisionAttention(nn.Module):
    """Bidirectional attention within each segment (frame pair, or window). q/k/v are separate projections (the
    HF checkpoint's fused `qkv` is split by the adapter) so tensor parallelism can shard them column-wise."""

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


class TwoLayerMLP(nn.Module):
    """fc2(act(fc1(x))), with the checkpoint's own names for the two projections (Qwen2-VL: fc1 / fc2; Qwen3-VL:
    linear_fc1 / linear_fc2)."""

    def __init__(self, dim: int, hidden: int, act: str, names: tuple[str, str] = ("fc1", "fc2")) -> None:
        super().__init__()
        self.names = names
        self.add_module(names[0], nn.Linear(dim, hidden))
        self.add_module(names[1], nn.Linear(hidden, dim))
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = (getattr(self, n) for n in self.names)
        return down(self.act(up(x)))


class GatedMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)) (the Qwen2 decoder's, and with biases Qwen2.5-VL's ViT MLP)."""

    def __init__(self, dim: int, hidden: int, act: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = F.silu if act == "silu" else activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


Recompute = Callable[..., torch.Tensor]
"""recompute(body, *args) -> body(*args), recomputing body's activations in backward (activation checkpointing)."""


def run_block(recompute: Recompute | None, body: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """body(*args), through the block's activation-checkpointing function when one is set."""
    return body(*args) if recompute is None else recompute(body, *args)


class VisionBlock(nn.Module):
    """Pre-norm ViT block: x + attn(norm1(x)), then + mlp(norm2(x)); the family gives the norms and the MLP."""

    def __init__(self, cfg: VisionConfig, backend: str, norm: Callable[[int, float], nn.Module],
                 mlp: nn.Module) -> None:
        super().__init__()
        self.norm1 = norm(cfg.embed_dim, cfg.layer_norm_eps)
        self.norm2 = norm(cfg.embed_dim, cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg, backend)
        self.mlp = mlp
        self.recompute: Recompute | None = None
        """Activation checkpointing of this block (set by parallel/checkpointing.py): recompute(body, *args) runs the
        block's computation so that its activations are recomputed in backward. It wraps the body only, never the
        module call, so the hooks of tensor and data parallelism run once per call, outside the recomputed region
        (their ops would otherwise replay in backward)."""

    def forward(self, x_NC, cu_seqlens, max_seqlen: int, rope) -> torch.Tensor:
        return run_block(self.recompute, self._body, x_NC, cu_seqlens, max_seqlen, rope)

    def _body(self, x_NC, cu_seqlens, max_seqlen: int, rope) -> torch.Tensor:
        x_NC = x_NC + self.attn(self.norm1(x_NC), cu_seqlens, max_seqlen, rope)
        return x_NC + self.mlp(self.norm2(x_NC))


class PatchMerger(nn.Module):
    """A norm over each patch (C), then a 2-layer GELU MLP over each 2x2 window's concatenated features
    (4C -> 4C -> D): Qwen2-VL (LayerNorm `ln_q`, `mlp.0` / `mlp.2`) and Qwen2.5-VL (RMSNorm `ln_q`)."""

    def __init__(self, cfg: VisionConfig, out_dim: int, norm: Callable[[int, float], nn.Module]) -> None:
        super().__init__()
        self.window_dim = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = norm(cfg.embed_dim, cfg.layer_norm_eps)
        # Sequential keeps the checkpoint's names (mlp.0 / mlp.2).
        self.mlp = nn.Sequential(
            nn.Linear(self.window_dim, self.window_dim), nn.GELU(), nn.Linear(self.window_dim, out_dim)
        )

    def forward(self, x_NC: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x_NC).view(-1, self.window_dim))


def layer_norm(dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps)


def vit_row_padding(grid_thw: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int]:
    """(grids, j): under sequence parallelism the ViT's rows must split evenly over tp; when the grids' rows are
    not a multiple of `multiple`, a blank image of grid (1, 2, 2j) (4j rows, its own attention segment, its j merged
    tokens dropped after the merger) is appended (host grids; parallel/tensor_parallel.py pads the pixels)."""
    grid = grid_thw.reshape(-1, 3).to("cpu", torch.long)
    N = int(grid.prod(-1).sum())
    if N % multiple == 0:
        return grid, 0
    j = next((j for j in range(1, 4 * multiple + 1) if (N + 4 * j) % multiple == 0), None)
    if j is None:
        raise ValueError(f"cannot pad {N} ViT rows to a multiple of {multiple} with 2x2 windows")
    return torch.cat([grid, torch.tensor([[1, 2, 2 * j]], dtype=torch.long)]), j


class VisionPlan(NamedTuple):
    """What the ViT derives from the grids, built on the host (VisionTower.plan) and moved to the device with the
    microbatch (core.batch.PackedBatch.prepared), so the tower's forward reads nothing back from the device and
    copies nothing from pageable host memory."""

    pos_N2: torch.Tensor
    """Rotary (row, col) of every patch row, in the order the blocks see the rows."""
    rows: torch.Tensor | None
    """The row permutation applied before the blocks (None: the processor's order)."""
    inverse: torch.Tensor | None
    """The merged-token permutation that restores the processor's order after the merger."""
    cu: tuple[torch.Tensor, ...]
    """The distinct attention segmentations (int32 cu_seqlens over rows)."""
    max_len: tuple[int, ...]
    """The longest segment of each segmentation."""
    block_segments: tuple[int, ...]
    """Per ViT block (by its index in the full model), the segmentation it attends within."""
    extra: dict[str, torch.Tensor]
    """A family's own inputs (Qwen3-VL: the position table's interpolation taps and weights)."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> VisionPlan:
        return tree_map_only(torch.Tensor, lambda t: t.to(device, non_blocking=non_blocking), self)


class VisionTower(nn.Module):
    """ViT + merger over packed patch rows (Qwen2-VL as is; the other families subclass it).

    forward(pixels_NP, grid_thw) -> (tokens_MD, deep_KMD): the merged tokens in pixel_values order and the DeepStack
    features (K = 0 rows for families without DeepStack), so every family's tower has one output contract. `blocks`
    is a ModuleDict so names survive pipeline pruning and DCP."""

    def __init__(self, cfg: ModelConfig, block: Callable[[int], nn.Module], merger: nn.Module,
                 patch_bias: bool = False) -> None:
        super().__init__()
        v = cfg.vision
        self.cfg = v
        self.row_padding: int | None = None
        """Set under sequence parallelism (parallel/tensor_parallel.py): rows are padded to a multiple of it
        (vit_row_padding) before the blocks."""
        self.patch_embed = PatchEmbed(v, bias=patch_bias)
        self.rotary = VisionRotary(v)
        self.blocks = nn.ModuleDict({str(i): block(i) for i in range(v.depth)})
        self.merger = merger

    # ---------------------------------------------------------------- what a family changes
    def embed_patches(self, pixels_NP: torch.Tensor, plan: VisionPlan) -> torch.Tensor:  # noqa: ARG002
        """Patch rows -> (N, C) inputs of the first block (in the processor's row order)."""
        return self.patch_embed(pixels_NP)

    def plan_extra(self, grid_thw: torch.Tensor) -> dict[str, torch.Tensor]:  # noqa: ARG002
        """The family's own host-built inputs of embed_patches (VisionPlan.extra)."""
        return {}

    def segments(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor | None, list[tuple[torch.Tensor, int]]]:
        """(row order, per block (cu_seqlens, max_seqlen)): the rows are permuted by `order` before the blocks and
        their merged tokens restored after the merger (None: processor order); every block attends within the
        frame pairs here."""
        cu = vision_cu_seqlens(grid_thw)
        max_len = int((grid_thw[:, 1] * grid_thw[:, 2]).max())
        return None, [(cu, max_len)] * len(self.blocks)

    def deepstack(self, index: int, x_NC: torch.Tensor) -> torch.Tensor | None:  # noqa: ARG002
        """The DeepStack feature (M, D) taken after block `index`, or None."""
        return None

    # ---------------------------------------------------------------- forward
    def plan(self, grid_thw: torch.Tensor) -> VisionPlan:
        """The host-side VisionPlan of these grids (I, 3) (host tensors; .to(device) moves it)."""
        grid_thw = grid_thw.to("cpu", torch.long).reshape(-1, 3)
        order, segments = self.segments(grid_thw)
        pos_N2 = vision_rope_positions(grid_thw, self.cfg.spatial_merge_size)
        rows = inverse = None
        if order is not None:  # whole merge windows (m2 rows each) move together, with their rotary positions
            m2 = self.cfg.spatial_merge_size**2
            rows = (order.view(-1, 1) * m2 + torch.arange(m2)).flatten()
            pos_N2, inverse = pos_N2[rows], torch.argsort(order)
        distinct: list[tuple[torch.Tensor, int]] = []
        block_segments = []
        for cu, max_len in segments:
            i = next((j for j, (c, _) in enumerate(distinct) if c is cu), None)
            if i is None:
                i = len(distinct)
                distinct.append((cu, max_len))
            block_segments.append(i)
        return VisionPlan(pos_N2, rows, inverse, tuple(c for c, _ in distinct), tuple(m for _, m in distinct),
                          tuple(block_segments), self.plan_extra(grid_thw))

    def forward(self, pixels_NP: torch.Tensor, grid_thw: torch.Tensor, plan: VisionPlan | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """`plan`: self.plan(grid_thw) already on the pixels' device (what the training loop passes, built on the
        host before the copy); without it, it is built here (tests, inference)."""
        if plan is None:
            plan = self.plan(grid_thw).to(pixels_NP.device)
        x_NC = self.embed_patches(pixels_NP, plan)
        if plan.rows is not None:
            x_NC = x_NC[plan.rows]
        rope = self.rotary(plan.pos_N2)
        deep = []
        for name, blk in self.blocks.items():
            seg = plan.block_segments[int(name)]
            x_NC = blk(x_NC, plan.cu[seg], plan.max_len[seg], rope)
            if (feat := self.deepstack(int(name), x_NC)) is not None:
                deep.append(feat)
        tokens_MD = self.merger(x_NC)
        deep_KMD = torch.stack(deep) if deep else tokens_MD.new_empty(0, *tokens_MD.shape)
        if plan.inverse is not None:
            tokens_MD, deep_KMD = tokens_MD[plan.inverse], deep_KMD[:, plan.inverse]
        return tokens_MD, deep_KMD
