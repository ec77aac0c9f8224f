"""Every layout computes what one process computes (multi-process, gloo, tiny model, fp32).

For dp2, tp2 (+SP), pp2, dp2 x tp2, dp2 x pp2 and tp2 x pp2: the same global batch (images, a video, text-only
samples, microbatches of distinct lengths that change every step) gives the same loss and the same full
gradients as the plain single-process model (max abs diff <= 1e-5 of each gradient's scale) and, after 3
AdamW steps, the same parameters. Each layout is one spawned job that also checks its own properties:
ZeRO-1 optimizer-state bytes, TP sharding and SP activation shapes, PP receive buffers of exactly each
microbatch's length, frozen parameters (recipe stages 1 and 3), ZeRO-3, tied embeddings across stages,
activation checkpointing, the replicated-weights check and DCP checkpoints that reshard across layouts.
Interleaved 1F1B (pp2 x 2 virtual stages, tied and untied, with tp2 + SP) is held to the same standard, and
ParallelModel.evaluate to the one-process forward loss (dp2, tp2, pp2, pp2 x v2, dp2 x tp2; uneven eval
counts across dp ranks).

The other families (Qwen2.5-VL: window attention under SP; Qwen3-VL: DeepStack in pipeline stage 0, QK-norm under
TP, the position table) run the same checks on the layouts the seam must hold: pp2, dp2 x tp2 + SP (with the
recipe stages' frozen groups) and tp2 x pp2 + SP from the meta device.

LoRA (model/lora.py) runs the same equality with adapters on (random B, frozen base) under dp2 (ZeRO-1 holds only
the adapters' optimizer state, bytes checked; compiled blocks), tp2 + SP (the factors' placements checked; with
dropout the replicated factors stay equal), pp2 and dp2 x tp2 from the meta device (Qwen3-VL).
"""

from __future__ import annotations

import pytest
from _dist import run_distributed
from _workers import interleaved_checkpoint_worker, layout_worker

pytestmark = pytest.mark.distributed


def _run(world: int, spec: dict, timeout: float = 240.0) -> list[dict]:
    reports = run_distributed(layout_worker, world, spec, timeout=timeout)
    for r in reports:
        print({k: v for k, v in r.items()})
    # Every rank agrees on the loss it reports (the loss is global).
    assert all(r["loss"] == reports[0]["loss"] for r in reports)
    return reports


@pytest.mark.timeout(300)
def test_dp2_zero1_frozen_and_zero3():
    reports = _run(2, {
        "parallel": {"dp": 2, "num_microbatches": 2},
        "eval": True,
        "checks": ["zero1", "zero1_comm", "variant:stage1_frozen_llm", "variant:stage3_frozen_vit", "variant:zero3"],
        "variants": {
            "stage1_frozen_llm": {"freeze": "llm"},
            "stage3_frozen_vit": {"freeze": "vision"},
            "zero3": {"parallel": {"zero_stage": 3}, "zero1_bytes": True},
        },
    })
    for r in reports:
        assert abs(r["zero1"]["ratio"] - 1.0) <= 0.10


@pytest.mark.timeout(300)
def test_tp2_sequence_parallel_tied():
    _run(2, {
        "parallel": {"tp": 2, "num_microbatches": 2},
        "tie": True,
        "eval": True,
        "checks": ["tp", "variant:no_sp", "variant:pad16", "variant:recipe_eps"],
        "variants": {
            "no_sp": {"parallel": {"sequence_parallel": False}},
            # Bucketed SP padding: sequences and ViT rows (blank-image padding) to multiples of 16.
            "pad16": {"parallel": {"sp_pad_multiple": 16}},
            # AdamW at the recipes' eps (1e-8), with the tolerance argued at NOISE_GRAD_REL in _workers.py.
            "recipe_eps": {"adam_eps": 1e-8},
        },
    })


@pytest.mark.timeout(300)
def test_pp2_dynamic_lengths():
    _run(2, {"parallel": {"pp": 2, "num_microbatches": 4, "pp_first_stage_layers": 1}, "checks": ["pp"],
             "eval": True})


_INTERLEAVED = {"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_virtual_stages": 2, "pp_first_stage_layers": 1}


@pytest.mark.timeout(300)
def test_pp2_interleaved_v2_untied_and_tied_meta():
    # 4 virtual stages of one decoder layer each; rank 0 holds stages 0 and 2, rank 1 stages 1 and 3.
    _run(2, {
        "parallel": {**_INTERLEAVED, "num_microbatches": 4},
        "eval": True,
        "checks": ["pp", "variant:tied_meta"],
        # Tied, built on the meta device, materialized and loaded (the trainer's path for big models).
        "variants": {"tied_meta": {"tie": True, "meta": True}},
    })


@pytest.mark.timeout(400)
def test_tp2_pp2_interleaved_v2_sp_tied_selective_ac():
    _run(4, {"parallel": {**_INTERLEAVED, "tp": 2, "num_microbatches": 4, "activation_checkpoint": "selective",
                          "check_replicated_every": 1},
             "tie": True, "checks": ["pp", "tp"]}, timeout=360)


@pytest.mark.timeout(400)
def test_dp2_pp2_interleaved_v2_full_ac_zero3_eval():
    # m = 2 = pp: rank 0 runs every forward in its warm-up (the all-warm-up path of the schedule).
    _run(4, {"parallel": {**_INTERLEAVED, "dp": 2, "num_microbatches": 2, "activation_checkpoint": "full"},
             "eval": True,
             "checks": ["pp", "variant:zero3"], "variants": {"zero3": {"parallel": {"zero_stage": 3}}}},
         timeout=360)


@pytest.mark.timeout(400)
def test_dp2_tp2_selective_ac_dcp(tmp_path):
    _run(4, {
        "parallel": {"dp": 2, "tp": 2, "num_microbatches": 2, "activation_checkpoint": "selective",
                     "check_replicated_every": 1, "loss_chunk_size": 5},  # several vocab-parallel head chunks
        "eval": True,
        "checks": ["tp", "dcp"],
        "tmpdir": str(tmp_path),
    }, timeout=360)


@pytest.mark.timeout(400)
def test_dp2_pp2_tied_block_ac():
    _run(4, {
        "parallel": {"dp": 2, "pp": 2, "num_microbatches": 3, "activation_checkpoint": "selective",
                     "ac_selective": "block", "ac_every": 2, "check_replicated_every": 2},
        "tie": True,
        "checks": ["pp"],
    }, timeout=360)


@pytest.mark.timeout(400)
def test_tp2_pp2_sp_tied_full_ac_meta_bf16():
    # Built on the meta device, materialized and loaded (the trainer's path for big models).
    _run(4, {
        "parallel": {"tp": 2, "pp": 2, "num_microbatches": 3, "activation_checkpoint": "full",
                     "check_replicated_every": 1},
        "tie": True,
        "meta": True,
        "checks": ["pp", "tp", "bf16_smoke"],
    }, timeout=360)


@pytest.mark.timeout(300)
def test_pp2_interleaved_checkpoint_resumes_into_1f1b_and_one_process(tmp_path):
    reports = run_distributed(interleaved_checkpoint_worker, 2, str(tmp_path), timeout=240)
    for r in reports:
        print({k: (len(v) if isinstance(v, list) else v) for k, v in r.items()})
    # The two pp2 stages together hold the one process's optimizer state (the tied embedding's on both).
    assert set(reports[0]["one_process_opt_keys"]) == set(reports[0]["pp2_opt_keys"]) | set(reports[1]["pp2_opt_keys"])


NEW_FAMILIES = ["qwen2_5_vl", "qwen3_vl"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_family_pp2_dynamic_lengths(family):
    _run(2, {"family": family, "eval": True, "checks": ["pp"],
             "parallel": {"pp": 2, "num_microbatches": 4, "pp_first_stage_layers": 1}})


@pytest.mark.timeout(500)
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_family_dp2_tp2_sp_frozen_stages(family):
    _run(4, {
        "family": family, "eval": True,
        "parallel": {"dp": 2, "tp": 2, "num_microbatches": 2, "activation_checkpoint": "selective",
                     "check_replicated_every": 1},
        "checks": ["tp", "variant:stage1_frozen_llm", "variant:stage3_frozen_vit"],
        "variants": {"stage1_frozen_llm": {"freeze": "llm"}, "stage3_frozen_vit": {"freeze": "vision"}},
    }, timeout=460)


@pytest.mark.timeout(500)
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_family_tp2_pp2_sp_tied_meta(family):
    _run(4, {
        "family": family, "tie": True, "meta": True,
        "parallel": {"tp": 2, "pp": 2, "num_microbatches": 3, "activation_checkpoint": "full",
                     "pp_first_stage_layers": 1, "check_replicated_every": 1},
        "checks": ["pp", "tp"],
    }, timeout=460)


# ------------------------------------------------------------------------------------------ LoRA
# Adapters on the LLM's attention and MLP, the ViT's and the merger's (random B, so every adapter gradient is
# non-zero at step 0): each layout equals one process with the same adapters, base weights frozen.
LORA = {"rank": 4, "alpha": 8.0, "vision": ["attn", "mlp"], "merger": ["all"]}


@pytest.mark.timeout(300)
def test_lora_dp2_zero1_full_ac_compile():
    """ZeRO-1 shards only the adapters' optimizer state (bytes checked); full activation checkpointing; a
    variant with blocks compiled (aot_eager) and the merger trained in full beside LLM adapters (stage 3's usual
    setting; without ViT adapters and checkpointing, which each multiply the graphs to compile)."""
    _run(2, {
        "parallel": {"dp": 2, "num_microbatches": 2, "activation_checkpoint": "full"},
        "lora": LORA, "eval": True,
        "checks": ["lora_opt", "variant:compiled_full_merger"],
        "variants": {"compiled_full_merger": {
            "eval": False,  # (no-grad forwards would compile graphs of their own)
            "parallel": {"compile": True, "compile_backend": "aot_eager", "activation_checkpoint": "none"},
            "lora": {**LORA, "vision": [], "merger": [], "fully_trainable": ["merger"]}}},
    })


@pytest.mark.timeout(300)
def test_lora_tp2_sequence_parallel():
    """Colwise adapters: A replicated, B Shard(0); rowwise: A Shard(1), B replicated (checked); SP and plain TP;
    with adapter dropout the replicated factors stay equal across the tp ranks."""
    _run(2, {
        "parallel": {"tp": 2, "num_microbatches": 2, "check_replicated_every": 1},
        "lora": LORA, "eval": True,
        "checks": ["tp", "lora_tp", "lora_opt", "lora_dropout", "variant:no_sp"],
        "variants": {"no_sp": {"parallel": {"sequence_parallel": False}}},
    })


@pytest.mark.timeout(300)
def test_lora_pp2_qwen2_5_vl():
    _run(2, {"family": "qwen2_5_vl", "lora": LORA, "eval": True, "checks": ["pp", "lora_opt"],
             "parallel": {"pp": 2, "num_microbatches": 4, "pp_first_stage_layers": 1}})


@pytest.mark.timeout(500)
def test_lora_dp2_tp2_sp_selective_ac_meta_qwen3_vl():
    """Qwen3-VL (DeepStack, QK-norm) from the meta device (the adapters materialize as on the CPU), stage 3's frozen
    ViT (adapters on the LLM and the merger only)."""
    _run(4, {
        "family": "qwen3_vl", "meta": True, "freeze": "vision",
        "lora": {**LORA, "vision": []},
        "parallel": {"dp": 2, "tp": 2, "num_microbatches": 2, "activation_checkpoint": "selective",
                     "check_replicated_every": 1},
        "checks": ["tp", "lora_tp", "lora_opt"],
    }, timeout=460)
