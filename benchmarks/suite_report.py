"""report.md of the GPU suite (benchmarks/gpu_suite.py), rendered from its report.json record after every part."""

from __future__ import annotations

from typing import Any


def _f(x: Any, nd: int = 1, pct: bool = False) -> str:
    if x is None or x == "":
        return "-"
    if isinstance(x, float):
        if pct:
            return f"{100 * x:.{nd}f}%"
        return f"{x:.3g}" if abs(x) < 1 else f"{x:,.{nd}f}"
    return str(x)


def markdown(r: dict[str, Any]) -> str:
    m, P = r["meta"], r["parts"]
    env = P.get("env", {})
    setup = m.get("setup") or {}
    oracle = setup.get("oracle") or {}
    warm = setup.get("warm_compile") or {}
    corr = m.get("correctness") or {}
    lines = [
        f"# GPU suite report ({m.get('mode')})", "",
        f"- device: {m.get('device')}; torch {m.get('torch')}, CUDA {m.get('cuda')}, Triton {m.get('triton')}",
        f"- date: {m.get('date')}; command: `{m.get('command')}`; wall {m.get('wall_s')} s of a "
        f"{m.get('time_limit_s')} s limit",
        f"- correctness: **{corr.get('verdict', '-')}** (passed {corr.get('passed')}, failed {corr.get('failed')}, "
        f"incomplete {corr.get('incomplete')}, not run {corr.get('not_run')})",
        f"- oracle: transformers {oracle.get('used')} (pinned {oracle.get('pinned')}"
        + (f"; {oracle['mismatch']}" if oracle.get("mismatch") else "") + ")",
        f"- process group of the configs: {m.get('backend')} "
        f"({(env.get('process_group') or {}).get('fallback') or 'as planned'}); "
        f"warm-up compile {warm.get('seconds', warm.get('error'))} s; {m.get('microbatches_per_step')} microbatches "
        "per optimizer step",
        f"- peak dense bf16 (datasheet): {env.get('peak_bf16_tflops')} TFLOP/s; measured {env.get('matmul_n')}^3 bf16 "
        f"matmul: {env.get('matmul_bf16_tflops_measured')} TFLOP/s; attention kernels (bf16): "
        f"{env.get('backends_bf16')}",
        "", "## Parts", "", "| part | status | seconds | share |", "|---|---|---|---|",
    ]
    for name, rec in P.items():
        lines.append(f"| {name} | {rec.get('status')} | {rec.get('seconds', '-')} | {rec.get('share_s')} |")
    lines += ["", "## Throughput and MFU (one GPU, bf16 compute, fp32 master weights)", "",
              "MFU doc-causal: ViT + merger + LLM + head FLOPs with each packed document's causal attention pairs "
              "(model/flops.py, the goal's convention); packed-full: the decoder's attention over the whole packed "
              "row as one T^2 sequence and the head on every token (torchtitan's count); LLM doc-causal: the "
              "decoder + head part of doc-causal over the same step time. TFLOP/s: doc-causal.", "",
              "| config | mode | AC | tokens/s | step ms | TFLOP/s | MFU doc-causal | MFU packed-full | "
              "MFU LLM doc-causal | peak GB | "
              "dry-run GB | peak/est | data wait ms | compiles (limit hits) | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in ("a", "b", "c", "d", "e"):
        for part, mode in ((f"{key}_eager", "eager"), (f"{key}_compiled", "compiled"), (key, "eager"),
                           (key, "compiled")):
            t = P.get(part, {}).get(mode)
            if not t:
                continue
            dyn = t.get("dynamo")
            comp = f"{dyn['cache_entries_added']} ({len(dyn['limit_hits'])})" if dyn else "-"
            note = "; ".join(str(t[k])[:160] for k in ("skipped", "skipped_without_ac", "oom_without_ac", "error")
                             if t.get(k))
            if t.get("compile_s") is not None:
                note = f"compile {t['compile_s']} s" + (f"; {note}" if note else "")
            lines.append(
                f"| {key} | {mode} | {t.get('activation_checkpoint', '-')} | {_f(t.get('tokens_per_s'), 0)} | "
                f"{_f(t.get('step_ms_median'))} | {_f(t.get('tflops_doc_causal_per_s'))} | "
                f"{_f(t.get('mfu_doc_causal'), 1, True)} | {_f(t.get('mfu_packed_full'), 1, True)} | "
                f"{_f(t.get('mfu_llm_doc_causal'), 1, True)} | "
                f"{_f(t.get('peak_gb'))} | "
                f"{_f(t.get('dry_run_gb'))} | {_f(t.get('peak_over_estimate'), 2)} | "
                f"{_f(t.get('data_wait_ms_median'), 2)} | {comp} | {note or '-'} |")
    prof = P.get("a_profile", {})
    if prof.get("split_ms"):
        n_mb = prof.get("microbatches_per_step")
        lines += ["", f"## Config (a): where one step's time goes (ms, {n_mb} microbatches)", "",
                  "| " + " | ".join(prof["split_ms"]) + " |", "|" + "---|" * len(prof["split_ms"]),
                  "| " + " | ".join(_f(v, 2) for v in prof["split_ms"].values()) + " |"]
    if (prof.get("kernels") or {}).get("top"):
        k = prof["kernels"]
        lines += ["", f"## Config (a): top kernels ({k['unit']}, {k['total_ms']} ms in all)", "",
                  "| kernel | ms | calls | share |", "|---|---|---|---|"]
        lines += [f"| `{x['name']}` | {x['ms']} | {x['calls']} | {_f(x['share'], 1, True)} |" for x in k["top"]]
    if prof.get("syncs"):
        sy = prof["syncs"]
        lines += ["", f"## Config (a): host-device synchronizations in one step: {sy['count']} ({sy['method']})", ""]
        lines += [f"- `{x['where']}`: {x['n']}" for x in sy["sites"]]
    bk = P.get("backends", {})
    if bk.get("kernels"):
        lines += ["", f"## Attention backends vs the fp32 reference (tolerance {bk.get('tolerance')})", "",
                  "| shape | backend | out rel | grad rel | ms (fwd+bwd, or fwd) | note |", "|---|---|---|---|---|---|"]
        for kind, group in [*bk["kernels"].items(), ("model", bk.get("model", {}))]:
            for b, x in group.items():
                if isinstance(x, dict) and "ok" in x:
                    ms = x.get("fwd_bwd_ms", x.get("fwd_ms"))
                    note = x.get("error") or (f"mask built once: {x['mask_ms']} ms" if "mask_ms" in x else "")
                    lines.append(f"| {kind} | {b} | {_f(x.get('out_rel', x.get('hidden_rel_vs_sdpa')), 2)} | "
                                 f"{_f(x.get('grad_rel'), 2)} | {_f(ms, 3)} | {str(note)[:120] or '-'} |")
    ac = P.get("ac_limits", {})
    if any(isinstance(v, dict) for v in ac.values()):
        lines += ["", "## Largest microbatch of config (a) per activation-checkpointing policy", "",
                  "| policy | largest tokens that ran | first OOM | peak GB at largest |", "|---|---|---|---|"]
        for pol in ("none", "selective", "full"):
            v = ac.get(pol) or {}
            ran = [t for t in v.get("tried", []) if not t.get("oom")]
            lines.append(f"| {pol} | {v.get('largest_tokens', '-')} | {v.get('first_oom_tokens', '-')} | "
                         f"{_f(ran[-1].get('peak_gb') if ran else None)} |")
    if prof.get("precision"):
        lines += ["", f"Mixed precision in one step of (a): {prof['precision']}"]
    lh = P.get("loss_head", {})
    if "loss_rel" in lh:
        lines += ["", "## Loss head (chunked fused CE), bf16 vs fp32", "",
                  f"shape {lh['shape']}: loss rel {lh['loss_rel']:.2e}, d/dh rel {lh['grad_h_rel']:.2e}, d/dW rel "
                  f"{lh['grad_w_rel']:.2e} (tolerance {lh['tolerance']}); fwd+bwd fp32 {lh['fp32_ms']} ms, bf16 "
                  f"{lh['bf16_ms']} ms"]
        if "eager_body_bf16_ms" in lh:  # the fused chunk body (CUDA) against the eager one, same shapes
            lines.append(f"eager chunk body: fp32 {lh['eager_body_fp32_ms']} ms, bf16 {lh['eager_body_bf16_ms']} ms "
                         f"(fused / eager bf16 {lh['bf16_ms'] / lh['eager_body_bf16_ms']:.2f})")
    g = P.get("golden", {})
    if "comparison" in g:
        lines += ["", "## Golden 30-step training vs the recorded CPU run", "",
                  f"{g['comparison']}; process group {g.get('backend')}, prefetched {g.get('prefetched_bytes')} bytes, "
                  f"fused AdamW {g.get('fused_adamw')}"]
    return "\n".join(lines) + "\n"
