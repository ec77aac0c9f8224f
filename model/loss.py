"""Language-model loss head that never materializes the full [tokens x vocab] logits.

Shape legend: T = packed tokens, D = width, V = vocab, S = supervised tokens, c = chunk rows.

`labels_T` are already shifted: labels_T[t] is the token predicted at position t, -100 where nothing is
supervised (vision tokens, prompts, the last token of each packed sample). Only the S supervised rows go
through the head, in chunks; each chunk's logits are recomputed in backward (activation checkpointing), so
peak memory is one chunk of logits instead of T x V.

Returns (loss_sum, n_supervised): the trainer divides by the GLOBAL supervised-token count
(dp x microbatches), not by a per-microbatch mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_ce(h_cD: torch.Tensor, w_VD: torch.Tensor, y_c: torch.Tensor) -> torch.Tensor:
    logits_cV = F.linear(h_cD, w_VD).float()
    return F.cross_entropy(logits_cV, y_c, reduction="sum")


def lm_loss(
    h_TD: torch.Tensor, w_VD: torch.Tensor, labels_T: torch.Tensor, *, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropies over supervised positions, and their count."""
    sel_S = torch.nonzero(labels_T.reshape(-1) != IGNORE_INDEX).flatten()
    n = torch.tensor(sel_S.numel(), device=h_TD.device, dtype=torch.long)
    h_TD = h_TD.reshape(-1, h_TD.shape[-1])
    if sel_S.numel() == 0:
        # Keep the graph connected (zero gradient) so every rank runs the same backward.
        return (h_TD.sum() * 0.0 + w_VD.sum() * 0.0).float(), n
    h_SD = h_TD.index_select(0, sel_S)
    y_S = labels_T.reshape(-1).index_select(0, sel_S)
    total = h_SD.new_zeros((), dtype=torch.float32)
    for s in range(0, sel_S.numel(), chunk_size):
        h_cD, y_c = h_SD[s : s + chunk_size], y_S[s : s + chunk_size]
        if torch.is_grad_enabled() and (h_cD.requires_grad or w_VD.requires_grad):
            total = total + checkpoint(_chunk_ce, h_cD, w_VD, y_c, use_reentrant=False)
        else:
            total = total + _chunk_ce(h_cD, w_VD, y_c)
    return total, n


def naive_lm_loss(h_TD: torch.Tensor, w_VD: torch.Tensor, labels_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference head: full logits for every position. For tests only."""
    logits_TV = F.linear(h_TD.reshape(-1, h_TD.shape[-1]), w_VD).float()
    y_T = labels_T.reshape(-1)
    return F.cross_entropy(logits_TV, y_T, ignore_index=IGNORE_INDEX, reduction="sum"), (y_T != IGNORE_INDEX).sum()
