"""The vision-language model every family shares: its vision tower + merger, token embedding, decoder with M-RoPE,
final norm and LM head, on packed input. Plain single-device modules.

Shape legend: T = packed tokens (several samples back to back), D = LLM width, N = ViT patches, M = merged vision
tokens, K = DeepStack levels, V = vocab.

Pipeline-friendly (torchtitan style): decoder layers live in a ModuleDict keyed by their global index; the
top modules (TOP_MODULES) may be set to None by a pipeline split, and a later stage's forward takes hidden states
instead of ids. The forward is a loop over whatever layers remain and returns hidden states; the loss is composed
outside the model (model.loss.lm_loss over `lm_head.weight`, or the engine's vocab-parallel version), and HF
checkpoints are read and written by model.hf_adapter. The family (model/family.py) builds the vision tower;
parallel/ finds the blocks it shards, checkpoints, compiles and splits through `transformer_blocks()`,
`decoder_layers()` and TOP_MODULES, never by a family's module names.

The inputs (one packed microbatch, see core/batch.py for the producer's contract):
  input_ids (T,) int64, position_ids (3, T) int64, cu_seqlens (S+1,) int32, max_seqlen int,
  pixel_values (N_img, P) + image_grid_thw (I, 3), pixel_values_videos (N_vid, P) + video_grid_thw (K, 3).

Inference (model/generate.py) adds one optional input, `kv_cache` (model.text.KVCache): the forward then runs ONE
sequence, appends every layer's keys and values to the cache, and attends over everything cached so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from model.config import ModelConfig
from model.family import check_config, get_family
from model.lora import LoRALinear
from model.text import DecoderLayer, KVCache, MRotary, RMSNorm
from model.vision import VisionPlan, normalize_pixel_rows, pixel_affine, vit_row_padding

TOP_MODULES = {"visual": "first", "embed_tokens": "first", "norm": "last", "lm_head": "last"}
"""The model's modules outside the decoder layers, by the pipeline stage that runs them."""


@dataclass
class DeepStack:
    """Qwen3-VL's DeepStack inputs of one microbatch: per level, the vision features (M, D) of the visual positions,
    expanded to (T, D) (zero elsewhere) only when its decoder layer runs, so at most one full-length copy exists."""

    features_KMD: torch.Tensor
    masks: tuple[torch.Tensor, torch.Tensor]
    """(image mask (T,), video mask (T,)) of the positions the features go to, images' rows first."""
    n_image: int
    """Rows of features that belong to images (the rest are videos')."""

    def level(self, k: int, dtype: torch.dtype) -> torch.Tensor:
        """Level k as a whole-sequence (T, D) tensor (under sequence parallelism the layer's input hook keeps this
        rank's rows)."""
        f_MD = self.features_KMD[k].to(dtype)
        out_TD = f_MD.new_zeros(self.masks[0].shape[0], f_MD.shape[1])
        out_TD = out_TD.masked_scatter(self.masks[0][:, None], f_MD[: self.n_image])
        return out_TD.masked_scatter(self.masks[1][:, None], f_MD[self.n_image :])


class VLModel(nn.Module):
    """The whole model (or, after a pipeline split, one stage of it), of any family (cfg.family)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        family = get_family(cfg.family)
        self.processing = family.processing(cfg)
        t = cfg.text
        self.visual: nn.Module | None = family.build_vision(cfg)
        self.embed_tokens: nn.Embedding | None = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(t, cfg.attn_backend) for i in range(t.num_layers)})
        self.norm: RMSNorm | None = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.lm_head: nn.Linear | None = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        if t.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = MRotary(t)
        # Raw uint8 pixel rows are normalized on the device with these (model.vision.pixel_affine); a buffer, so no
        # forward copies the family's mean / std from the host.
        self.register_buffer("pixel_affine", pixel_affine(self.processing), persistent=False)
        self.init_weights()

    # ------------------------------------------------------------------------------------ structure (for parallel/)
    def decoder_layers(self) -> nn.ModuleDict:
        """The decoder layers this stage holds, keyed by global index (a pipeline split deletes entries)."""
        return self.layers

    def named_decoder_layers(self) -> list[tuple[str, nn.Module]]:
        """(FQN, layer) of the decoder layers this stage holds."""
        return [(f"layers.{n}", b) for n, b in self.layers.items()]

    def vision_blocks(self) -> list[tuple[str, nn.Module]]:
        """(FQN, block) of the ViT blocks this stage holds (none after a pipeline split's later stages)."""
        return [] if self.visual is None else [(f"visual.blocks.{n}", b) for n, b in self.visual.blocks.items()]

    def transformer_blocks(self) -> list[tuple[str, nn.Module]]:
        """(FQN, module) of every ViT block and decoder layer this stage holds: the units of activation
        checkpointing, compile and FSDP."""
        return self.vision_blocks() + self.named_decoder_layers()

    # ------------------------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Qwen-style init: normal(0, std) for linear/conv/embedding weights, zero biases, unit norms; LoRA
        adapters (model/lora.py) as at creation."""
        for m in self.modules():
            if any(p.is_meta for p in m.parameters(recurse=False)):
                continue  # nothing to initialize on the meta device (and meta normal_ is slow at 72B)
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                if isinstance(m, LoRALinear):
                    m.reset_lora_parameters()  # B = 0: the adapted model starts as the base model
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-persistent buffers (neither checkpoints nor `to_empty` carry them) on `device`
        (default: where they are now): the rotary frequencies (fp32), M-RoPE's stream of each frequency, the
        pixel normalization."""
        device = device if device is not None else self.rotary.inv_freq.device
        rotaries = [self.rotary] + ([self.visual.rotary] if self.visual is not None else [])
        for rot in rotaries:
            rot.inv_freq = rot.fresh_inv_freq(device)
        self.rotary.stream_of_freq = self.rotary.fresh_streams(device)
        self.pixel_affine = pixel_affine(self.processing, device)

    # ------------------------------------------------------------------------------------ embedding
    def _dummy_vision(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A 1-frame-pair, 2x2-patch blank image: the smallest input the ViT + merger accept."""
        m = self.cfg.vision.spatial_merge_size
        return torch.zeros(m * m, self.cfg.vision.patch_dim, device=device), self._dummy_grid()

    def host_inputs(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                    video_grid_thw: torch.Tensor | None) -> dict:
        """The forward's host-built keyword arguments for one microbatch, from its host tensors: the ViT's plan
        (VisionTower.plan of the images' then the videos' grids, or of the blank image a text-only microbatch runs)
        and the placeholder counts. Moved to the device with the microbatch, they spare the forward every read
        back from the device (core.batch.PackedBatch.prepared)."""
        ids_T = input_ids.reshape(-1)
        counts = (int((ids_T == self.cfg.image_token_id).sum()), int((ids_T == self.cfg.video_token_id).sum()))
        out: dict = {"placeholder_counts": counts}
        if self.visual is not None:
            grids = [g.reshape(-1, 3) for g in (image_grid_thw, video_grid_thw) if g is not None and g.numel()]
            grid = torch.cat(grids) if grids else self._dummy_grid()
            if self.visual.row_padding:  # sequence parallelism pads the rows with a blank image: plan those
                grid, _ = vit_row_padding(grid, self.visual.row_padding)
            out["vision_plan"] = self.visual.plan(grid)
        return out

    def _dummy_grid(self) -> torch.Tensor:
        m = self.cfg.vision.spatial_merge_size
        return torch.tensor([[1, m, m]])

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with vision embeddings scattered into the image/video pad positions (without
        DeepStack's later additions; forward() applies those)."""
        return self._embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)[0]

    def _embed(self, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
               vision_plan: VisionPlan | None = None, placeholder_counts: tuple[int, int] | None = None,
               ) -> tuple[torch.Tensor, DeepStack | None]:
        """(embeddings (T, D), DeepStack inputs or None). `vision_plan` / `placeholder_counts`: host_inputs()'s,
        on the device (else computed here, reading the ids back).

        NOTE: images and videos go through ONE ViT call (their segments never mix). When the microbatch has
        no vision input, a blank image runs instead and is added with weight zero, so every rank runs the
        same vision graph and the vision parameters always get a (zero) gradient: no data-parallel rank waits
        on a collective that another rank skipped.
        """
        assert self.embed_tokens is not None, "embed() runs on the first pipeline stage only"
        ids_T = input_ids.reshape(-1)
        h_TD = self.embed_tokens(ids_T)
        if self.visual is None:
            return h_TD, None
        masks = (ids_T == self.cfg.image_token_id, ids_T == self.cfg.video_token_id)
        if placeholder_counts is None:
            placeholder_counts = tuple(torch.stack([m.sum() for m in masks]).tolist())  # one read for both
        pix, grids = [], []
        for rows, grid in ((pixel_values, image_grid_thw), (pixel_values_videos, video_grid_thw)):
            if rows is not None and rows.numel():
                pix.append(normalize_pixel_rows(rows, self.processing, self.pixel_affine))
                grids.append(grid.reshape(-1, 3))
        n_img_rows = pix[0].shape[0] if pixel_values is not None and pixel_values.numel() else 0
        if not pix:
            n_img, n_vid = placeholder_counts
            if n_img or n_vid:
                raise ValueError(
                    f"input_ids hold {n_img} <|image_pad|> and {n_vid} <|video_pad|> tokens but no pixel_values / "
                    "pixel_values_videos were given (0 embeddings from the ViT)"
                )
            dummy_pix, dummy_grid = self._dummy_vision(h_TD.device)
            v_MD, deep_KMD = self.visual(dummy_pix.to(h_TD.dtype), dummy_grid, vision_plan)
            return h_TD + 0.0 * (v_MD.sum() + deep_KMD.sum()).to(h_TD.dtype), None
        v_MD, deep_KMD = self.visual(torch.cat(pix).to(h_TD.dtype), torch.cat(grids).cpu(), vision_plan)
        merge = self.cfg.vision.spatial_merge_size ** 2
        n_img_tok = n_img_rows // merge
        for mask_T, n_pad, emb_MD, kind in (
            (masks[0], placeholder_counts[0], v_MD[:n_img_tok], "image"),
            (masks[1], placeholder_counts[1], v_MD[n_img_tok:], "video"),
        ):
            if n_pad != emb_MD.shape[0]:
                raise ValueError(
                    f"{kind} placeholders and {kind} embeddings differ: {n_pad} <|{kind}_pad|> tokens in input_ids, "
                    f"{emb_MD.shape[0]} embeddings from the ViT (grid_thw product / {merge})"
                )
            if n_pad:
                h_TD = h_TD.masked_scatter(mask_T[:, None], emb_MD.to(h_TD.dtype))
        deep = DeepStack(deep_KMD, masks, n_img_tok) if deep_KMD.shape[0] else None
        return h_TD, deep

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
        vision_plan: VisionPlan | None = None,
        placeholder_counts: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """One packed microbatch through the modules this (stage of the) model holds: the hidden states (T, D),
        normalized when this stage holds the final norm. Stage 0 takes ids (and pixels); later stages take the
        previous stage's `hidden_states`.

        With `kv_cache` (inference, model/generate.py): one sequence, whose new tokens attend to everything the
        cache holds; continuing a cached sequence needs explicit `position_ids` (generated tokens continue after
        the prompt's highest M-RoPE id, not after its length). `vision_plan` / `placeholder_counts`: host_inputs()'s
        on the device, so nothing is read back from it (the training loop's microbatches carry them)."""
        deep = None
        if hidden_states is None:
            if self.embed_tokens is None:
                raise ValueError("a stage without embed_tokens needs hidden_states from the previous stage")
            h_TD, deep = self._embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                                     vision_plan, placeholder_counts)
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
        for name, layer in self.layers.items():
            kw = {} if kv_cache is None else {"kv_cache": kv_cache, "layer": name}
            if deep is not None and int(name) < deep.features_KMD.shape[0]:
                # NOTE: DeepStack layers sit in pipeline stage 0 (ModelFamily.stage0_decoder_layers), with the ViT.
                kw["deepstack"] = deep.level(int(name), h_TD.dtype)
            h_TD = layer(h_TD, rope, cu_seqlens, max_seqlen, **kw)
        if kv_cache is not None:
            kv_cache.advance(T)
        if self.norm is not None:
            h_TD = self.norm(h_TD)
        return h_TD

    def logits(self, h_TD: torch.Tensor) -> torch.Tensor:
        """Full logits (T, V): for parity checks and inference, never in training."""
        assert self.lm_head is not None
        return self.lm_head(h_TD)
