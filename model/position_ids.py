"""M-RoPE position ids, following Qwen's reference ``get_rope_index`` (Qwen2-VL release, transformers 4.45; the
same algorithm with video time in Qwen2.5-VL's release, transformers 4.49-4.5x and qwen-vl-finetune's rope2d.py).

For one sample:
- text tokens get three equal ids, counting up from the running position;
- a vision block of llm grid (t, h, w) = (grid_t, grid_h/2, grid_w/2) gets ids
  (t_id, h_idx, w_idx) + start, where start is the running position when the block begins and t_id is the frame
  pair's index (Qwen2-VL), or, with a temporal scale s (Qwen2.5-VL videos: tokens_per_second x seconds per frame
  pair), floor(index x s);
- the text after a block continues at the block's maximum id + 1 (= start + max(t, h, w) without a scale).
Qwen3-VL videos are split into one block per frame pair by the processor (each has its own text timestamp), so
they reach this function as t = 1 blocks (model/processing.py splits the grids).

NOTE: transformers 5.x advances the running position by max(grid_h, grid_w) // 2 after a vision block
instead of max(t, h, w). The two agree for images (t = 1) and for videos whose frame-pair count does not
exceed the merged spatial size, and differ for long videos (t > max(h, w)). The released Qwen2-VL weights
were trained with the reference, so that is what we compute; tests pin both behaviours.

Packed sequences: positions restart at 0 for every sample (cu_seqlens boundaries).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from model.config import IMAGE_PAD_ID, VIDEO_PAD_ID


def _grid_rows(grid: torch.Tensor | None) -> list[tuple[int, int, int]]:
    if grid is None:
        return []
    return [tuple(int(x) for x in row) for row in grid.reshape(-1, 3).tolist()]


def mrope_position_ids(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    *,
    spatial_merge_size: int = 2,
    image_token_id: int = IMAGE_PAD_ID,
    video_token_id: int = VIDEO_PAD_ID,
    video_time_scale: Sequence[float] | None = None,
) -> torch.Tensor:
    """Position ids (3, L) for ONE sample's token ids (L,), consuming the grids in placeholder order.

    video_time_scale: per video, the temporal scale s (temporal id = floor(index x s), computed in float32 as
    transformers does); None = the frame pair's index. Raises ValueError when the placeholder runs do not match
    the grids (count or length).
    """
    ids = input_ids.reshape(-1)
    L = ids.numel()
    images, videos = _grid_rows(image_grid_thw), _grid_rows(video_grid_thw)
    is_vis = (ids == image_token_id) | (ids == video_token_id)
    pos_3L = torch.empty(3, L, dtype=torch.long)
    # Vision token starts: a vision token whose predecessor is not of the same kind starts a run; a run may
    # hold several blocks back to back (e.g. two images without separators), so walk by grid size.
    vis_idx = torch.nonzero(is_vis).flatten().tolist()
    ii = vi = 0
    cursor = 0  # next token index to assign
    running = 0  # next position id
    k = 0
    while k < len(vis_idx):
        start_tok = vis_idx[k]
        # text before the block
        n_text = start_tok - cursor
        if n_text:
            pos_3L[:, cursor:start_tok] = torch.arange(running, running + n_text).expand(3, -1)
            running += n_text
        tok = int(ids[start_tok])
        if tok == image_token_id:
            if ii >= len(images):
                raise ValueError(f"more image placeholder blocks than image_grid_thw rows ({len(images)})")
            t, h, w = images[ii]
            scale = None
            ii += 1
        else:
            if vi >= len(videos):
                raise ValueError(f"more video placeholder blocks than video_grid_thw rows ({len(videos)})")
            t, h, w = videos[vi]
            scale = video_time_scale[vi] if video_time_scale is not None else None
            vi += 1
        lt, lh, lw = t, h // spatial_merge_size, w // spatial_merge_size
        n_vis = lt * lh * lw
        end_tok = start_tok + n_vis
        if end_tok > L or not bool((ids[start_tok:end_tok] == tok).all()):
            have = int((ids[start_tok:min(end_tok, L)] == tok).sum())
            raise ValueError(
                f"vision block at token {start_tok} needs {n_vis} consecutive placeholders for grid "
                f"{(t, h, w)}, found {have}"
            )
        t_ids = torch.arange(lt)
        if scale is not None:
            t_ids = (t_ids * torch.tensor(scale, dtype=torch.float32)).long()
        t_idx = t_ids.view(-1, 1).expand(-1, lh * lw).flatten()
        h_idx = torch.arange(lh).view(1, -1, 1).expand(lt, -1, lw).flatten()
        w_idx = torch.arange(lw).view(1, 1, -1).expand(lt, lh, -1).flatten()
        pos_3L[:, start_tok:end_tok] = torch.stack([t_idx, h_idx, w_idx]) + running
        running += max(int(t_ids[-1]) + 1, lh, lw)  # reference: the block's max id + 1
        cursor = end_tok
        k = bisect.bisect_left(vis_idx, cursor, lo=k)
    if ii != len(images) or vi != len(videos):
        raise ValueError(
            f"placeholder blocks consumed {ii}/{len(images)} image grids and {vi}/{len(videos)} video grids"
        )
    if cursor < L:
        pos_3L[:, cursor:] = torch.arange(running, running + L - cursor).expand(3, -1)
    return pos_3L


def packed_mrope_position_ids(
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    *,
    spatial_merge_size: int = 2,
    image_token_id: int = IMAGE_PAD_ID,
    video_token_id: int = VIDEO_PAD_ID,
    video_time_scale: Sequence[float] | None = None,
) -> torch.Tensor:
    """Position ids (3, T) for a packed sequence: each sample restarts at 0; grids (and video time scales) in
    placeholder order."""
    ids = input_ids.reshape(-1)
    merge = spatial_merge_size**2
    images, videos = _grid_rows(image_grid_thw), _grid_rows(video_grid_thw)
    out = []
    ii = vi = 0
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        seg = ids[s:e]
        # Grids belong to a sample in order; count its placeholder tokens to know how many it takes.
        n_img_tok, n_vid_tok = int((seg == image_token_id).sum()), int((seg == video_token_id).sum())
        i0, v0 = ii, vi
        acc = 0
        while acc < n_img_tok:
            if ii >= len(images):
                raise ValueError(f"sample at [{s}, {e}) has {n_img_tok} image tokens but image grids ran out")
            t, h, w = images[ii]
            acc += t * h * w // merge
            ii += 1
        acc = 0
        while acc < n_vid_tok:
            if vi >= len(videos):
                raise ValueError(f"sample at [{s}, {e}) has {n_vid_tok} video tokens but video grids ran out")
            t, h, w = videos[vi]
            acc += t * h * w // merge
            vi += 1
        out.append(
            mrope_position_ids(
                seg,
                torch.tensor(images[i0:ii]) if ii > i0 else None,
                torch.tensor(videos[v0:vi]) if vi > v0 else None,
                spatial_merge_size=spatial_merge_size,
                image_token_id=image_token_id,
                video_token_id=video_token_id,
                video_time_scale=video_time_scale[v0:vi] if video_time_scale is not None else None,
            )
        )
    return torch.cat(out, dim=1) if out else torch.empty(3, 0, dtype=torch.long)
