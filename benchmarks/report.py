"""Goals, the markdown report and the PNG plots, all from the result dict (so they can be rebuilt
from a saved JSON: ``python -m benchmarks.report RESULTS.json``).

About 450 lines: one section renderer per benchmark group, kept together so every table of one
report reads its figures the same way (medians, machine, the goal verdicts) from one result dict."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from diffgap.core.fsutil import atomic_path, atomic_write_text

from .context import GOAL_ROOFLINE_BATCH, GOAL_SPEEDUP_BATCH, GOAL_STEPS

DENOISER_BACKENDS = (
    ("torch-eager", "fp32", "eager"),
    ("torch-compile", "fp32", "compile"),
    ("ort-cpu", "fp32", "ORT fp32"),
    ("ort-cpu", "fp16-graph", "ORT fp16 graph*"),
    ("tensorrt", "fp16", "TRT fp16"),
    ("tensorrt+cuda-graph", "fp16", "TRT fp16+graph"),
)


# ---- lookups ------------------------------------------------------------------------------------
def _rows(res: dict[str, Any], group: str) -> list[dict[str, Any]]:
    return [r for r in res.get("rows", []) if r["group"] == group]


def _find(res, group, backend, precision, batch, steps=None, name=None):
    for r in _rows(res, group):
        if (r["backend"], r["precision"], r["batch"]) == (backend, precision, batch) and (steps is None or r["steps"] == steps) \
                and (name is None or r["name"] == name):
            return r
    return None


def _med(r) -> float | None:
    return r["stats"]["median_ms"] if r and r.get("status") == "ok" and r.get("stats") else None


def _fmt_ms(r) -> str:
    if r is None:
        return "-"
    if r["status"] != "ok":
        return "skipped" if r["status"] == "skipped" else "failed"
    s = r["stats"]
    return f"{s['median_ms']:.3g} [{s['p10_ms']:.3g}-{s['p90_ms']:.3g}]"


def _triton_run(res, model, protocol, conc, label="default"):
    for t in res.get("triton", []):
        if t.get("label") != label:
            continue
        for run in t.get("runs", []):
            if (run.get("model"), run.get("protocol"), run.get("concurrency")) == (model, protocol, conc) and run.get("status") == "ok":
                return run
    return None


def _batches(run) -> str:
    """Mean executed batch of the composing models (the ensemble itself always counts 1 per request)."""
    mb = {k: v for k, v in run.get("mean_batch", {}).items() if k != run.get("model")}
    return ", ".join(f"{k} {v:.2g}" for k, v in sorted(mb.items()))


# ---- goals --------------------------------------------------------------------------------------
# Triton ensemble -> the in-process Pipeline doing the same work (tokenizer/encoder -> noise -> sampler).
OVERHEAD_PAIRS = (("text_to_audio_embedding", "TextToAudioBridge"), ("audio_to_text_embedding", "AudioToTextBridge"))

def goal_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The four speed goals (fused vs eager, roofline, Triton overhead, batching): measured figure, met / missed / not measured, and the figures that say why."""
    sizes = res["settings"]
    steps = GOAL_STEPS if GOAL_STEPS in sizes["steps"] else sizes["steps"][len(sizes["steps"]) // 2]
    b_small = GOAL_SPEEDUP_BATCH if GOAL_SPEEDUP_BATCH in sizes["batches"] else min(sizes["batches"])
    b_large = GOAL_ROOFLINE_BATCH if GOAL_ROOFLINE_BATCH in sizes["batches"] else max(sizes["batches"])
    roof = res.get("roofline", {})
    goals = []

    er = _find(res, "denoiser", "torch-eager", "fp32", b_small, steps)
    orr = _find(res, "denoiser", "ort-cpu", "fp32", b_small, steps)
    eager, ort = _med(er), _med(orr)
    g = {"goal": f"fused ORT >= 4x eager PyTorch loop (B={b_small}, K={steps})", "target": ">= 4.0x"}
    if eager and ort:
        # Judged best against best: the fastest eager setting tried (thread count) against the fastest
        # ORT setting tried (knobs), so neither side is handicapped by a default.
        def best(backend, default_row):
            cands = [(default_row["extra"].get("variant", "default"), _med(default_row))] + [
                (r["extra"]["variant"], _med(r)) for r in _rows(res, "knobs")
                if r["backend"] == backend and r["batch"] == b_small and r["steps"] == steps and _med(r)]
            return min(cands, key=lambda c: c[1])

        (ev, eb), (ov, ob) = best("torch-eager", er), best("ort-cpu", orr)
        x = eb / ob
        g.update(measured=f"{x:.2f}x best vs best (eager `{ev}` {eb:.3g} ms, ORT `{ov}` {ob:.3g} ms); "
                          f"{eager / ort:.2f}x with defaults ({eager:.3g} ms -> {ort:.3g} ms)", value=x, met=x >= 4.0)
        ex = orr["extra"]
        why = f"per step: eager {eb / steps:.3g} ms, ORT {ob / steps:.3g} ms"
        if "weight_bytes_streamed" in ex:
            why += (f"; the fused graph reads {ex['weight_bytes_streamed'] / steps / 1e6:.1f} MB of weights per step "
                    f"(both CFG branches, one stacked pass), i.e. {ex['weight_bytes_streamed'] / (ob * 1e6):.0f} GB/s effective")
        g["why"] = why
    goals.append(g)

    r = _find(res, "denoiser", "ort-cpu", "fp32", b_large, steps)
    g = {"goal": f"fused ORT within 2x of the roofline (B={b_large}, K={steps})", "target": "bound / time >= 0.50"}
    if r and r["status"] == "ok" and "roofline_fraction" in r["extra"]:
        ex = r["extra"]
        f = ex["roofline_fraction"]
        g.update(measured=f"{f:.2f} of the {ex['bound_by']}-bound {ex['bound_ms']:.3g} ms (measured {_med(r):.3g} ms)", value=f, met=f >= 0.5)
        why = (f"achieved {ex.get('achieved_gflops', 0):.1f} GFLOP/s vs the measured sgemm peak {roof.get('peak_gflops', float('nan')):.1f}; "
               f"intensity {ex['intensity_flops_per_byte']:.1f} FLOP/byte vs ridge {roof.get('ridge_flops_per_byte', float('nan')):.1f}")
        if "roofline_fraction_cache" in ex:
            why += f"; against the cache-resident bandwidth the fraction is {ex['roofline_fraction_cache']:.2f}"
        g["why"] = why
    goals.append(g)

    labels = [t["label"] for t in res.get("triton", []) if not t.get("error")]
    inproc_r = _find(res, "pipeline", "ort-cpu", "fp32", 1, name="TextToAudioBridge")
    for ensemble, pipeline in OVERHEAD_PAIRS:
        ref = _find(res, "pipeline", "ort-cpu", "fp32", 1, name=pipeline)
        inproc = _med(ref)
        for protocol in ("grpc", "http"):
            g = {"goal": f"Triton ensemble p50 overhead <= 10% over in-process Pipeline (`{ensemble}` vs {pipeline}, "
                         f"{protocol}, c=1)", "target": "<= +10%"}
            cands = [(lbl, _triton_run(res, ensemble, protocol, 1, lbl)) for lbl in labels]
            cands = [(lbl, run) for lbl, run in cands if run]
            if inproc and cands:
                lbl, run = min(cands, key=lambda c: c[1]["p50_ms"])
                ov = run["p50_ms"] / inproc - 1.0
                g.update(measured=f"{ov * 100:+.1f}% ({run['p50_ms']:.3g} ms vs {inproc:.3g} ms; repository '{lbl}')", value=ov, met=ov <= 0.10)
                if "steps_compute_ms" in run:
                    comp, queue = run["steps_compute_ms"], run["steps_queue_ms"]
                    rest = run["p50_ms"] - comp - queue
                    g["why"] = (f"{run['p50_ms'] - inproc:+.3g} ms per request. Triton statistics over the "
                                f"{len(run.get('steps', {}))} composing models: compute {comp:.3g} ms in all (the same "
                                f"graphs take {inproc:.3g} ms in process), dynamic-batching queue {queue:.3g} ms; "
                                f"client, network and ensemble hand-offs "
                                f"{'< 1' if rest < 1.0 else format(rest, '.3g')} ms (p50 minus the mean server-side times)")
            goals.append(g)

    concs = sizes["concurrency"]
    hi = 8 if 8 in concs else max(concs)
    p1 = _med(inproc_r)
    pb = [r for r in res.get("rows", []) if r["group"] == "pipeline" and r["name"] == "TextToAudioBridge" and r["status"] == "ok" and r["batch"] > 1]
    for protocol in ("grpc", "http"):
        g = {"goal": f"dynamic batching >= 4x throughput at c={hi} vs c=1 ({protocol})", "target": ">= 4.0x"}
        best = None
        for lbl in labels:
            r1 = _triton_run(res, "text_to_audio_embedding", protocol, 1, lbl)
            rh = _triton_run(res, "text_to_audio_embedding", protocol, hi, lbl)
            if r1 and rh and r1["throughput_infer_s"] > 0:
                x = rh["throughput_infer_s"] / r1["throughput_infer_s"]
                # the repository setting with the highest throughput at c=hi, not the best-looking ratio
                if best is None or rh["throughput_infer_s"] > best[3]["throughput_infer_s"]:
                    best = (x, lbl, r1, rh)
        if best:
            x, lbl, r1, rh = best
            g.update(measured=f"{x:.2f}x ({r1['throughput_infer_s']:.3g} -> {rh['throughput_infer_s']:.3g} infer/s; repository '{lbl}')",
                     value=x, met=x >= 4.0)
            why = f"mean executed batch at c={hi}: {_batches(rh)}"
            if p1 and pb:
                b = max(r["batch"] for r in pb)
                tb = _med(next(r for r in pb if r["batch"] == b))
                why += (f"; in process, one batch of {b} costs {tb:.3g} ms vs {p1:.3g} ms for 1, so batching alone can raise "
                        f"throughput at most {b * p1 / tb:.2f}x on this machine")
            g["why"] = why
        goals.append(g)
    for g in goals:
        g.setdefault("measured", "not measured")
        g.setdefault("met", None)
        g.setdefault("why", "")
    return goals


# ---- markdown -----------------------------------------------------------------------------------
def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    roof = res.get("roofline", {})
    st = res["settings"]
    out = [f"# diffgap benchmarks: {m['host']} ({res['created']})", ""]
    gpu = m.get("gpu")
    out.append(
        f"Machine: {m['cpu_model']}, {m.get('physical_cores')} cores / {m.get('logical_cpus')} threads "
        f"({m.get('threads_used')} used), {m.get('memory_gb')} GiB RAM, caches {m.get('caches', {})}, "
        f"{'GPU ' + gpu['name'] if gpu else 'no GPU'}; {'virtualised; ' if m.get('virtualised') else ''}"
        f"load average at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')}."
    )
    out.append("Versions: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()) + ".")
    out.append(
        f"Preset `{st['preset']}` with random weights (an untrained model times the same as a trained one: same "
        f"graph, same shapes; the zero-initialised adaLN/output layers are given random values so no "
        f"all-zero shortcut is timed). Timing: {st['policy']['warmup']} warm-up calls, then at least "
        f"{st['policy']['repeats']} calls and {st['policy']['min_time_s']} s (at most {st['policy']['max_time_s']} s); "
        f"median [p10-p90] in ms."
    )
    if res.get("load_warning"):
        out += ["", f"**Warning:** {res['load_warning']}"]
    out.append("")

    if roof:
        out.append("## Roofline (measured in this run)")
        out.append("")
        pk, dr = roof.get("peak", {}), roof.get("dram", {})
        body = [
            ["fp32 matmul peak", f"{roof['peak_gflops']:.1f} GFLOP/s",
             f"best of torch.mm {pk.get('torch_gflops', float('nan')):.1f} / numpy {pk.get('numpy_gflops', float('nan')):.1f} at n={pk.get('n')}"],
            ["DRAM bandwidth", f"{roof['bandwidth_gbs']:.1f} GB/s",
             f"best of copy {dr.get('copy_gbs', 0):.1f} / triad {dr.get('triad_gbs', 0):.1f}, {dr.get('array_mb', 0):.0f} MB arrays, {dr.get('impl')}"],
        ]
        if "cache_bandwidth_gbs" in roof:
            body.append(["bandwidth at the sampler's weight working set", f"{roof['cache_bandwidth_gbs']:.1f} GB/s",
                         f"{roof['cache_bandwidth_working_set_mb']:.1f} MB: the weights fit in cache; bounds use DRAM, the cache figure is in the JSON"])
        if "peak_end" in roof:
            body.append(["fp32 matmul peak, re-measured at the end", f"{roof['peak_end']['peak_gflops']:.1f} GFLOP/s",
                         "a drop means other load appeared during the run"])
        out += [_table(["", "value", "how"], body), ""]

    den = _rows(res, "denoiser")
    if den:
        out.append("## Fused denoiser (`%s`), per call" % den[0]["name"])
        out.append("")
        header = ["K", "B"] + [lbl for _, _, lbl in DENOISER_BACKENDS] + ["ORT/eager", "GFLOP", "MB moved", "bound ms", "ORT fp32 of bound"]
        body = []
        for k in st["steps"]:
            for b in st["batches"]:
                cells = [str(k), str(b)]
                for backend, prec, _ in DENOISER_BACKENDS:
                    cells.append(_fmt_ms(_find(res, "denoiser", backend, prec, b, k)))
                e, o = _med(_find(res, "denoiser", "torch-eager", "fp32", b, k)), _find(res, "denoiser", "ort-cpu", "fp32", b, k)
                cells.append(f"{e / _med(o):.2f}x" if e and _med(o) else "-")
                ex = (o or {}).get("extra", {})
                cells.append(f"{ex['flops'] / 1e9:.3g}" if "flops" in ex else "-")
                cells.append(f"{ex['bytes'] / 1e6:.3g}" if "bytes" in ex else "-")
                cells.append(f"{ex['bound_ms']:.3g} ({ex['bound_by']})" if "bound_ms" in ex else "-")
                cells.append(f"{ex['roofline_fraction']:.2f}" if "roofline_fraction" in ex else "-")
                body.append(cells)
        out += [_table(header, body), ""]
        out.append("\\* ORT's CPU provider has no FP16 GEMM: the FP16 graph runs float32 kernels after inserted casts, "
                   "so this column measures ORT CPU's upcast path, not FP16 arithmetic (FP16 graphs are for TensorRT).")
        fails = {(r["backend"], r["reason"]) for r in den if r["status"] != "ok"}
        for backend, reason in sorted(fails):
            out.append(f"- `{backend}` not measured: {reason}")
        comp = [r for r in den if r["backend"] == "torch-compile" and r["status"] == "ok" and "first_call_s" in r["extra"]]
        if comp:
            out.append("- torch.compile compiles the denoiser network (the K-step loop and DDIM update stay eager python); "
                       "first-call time (includes compiling for a new batch size): " + ", ".join(
                           f"K={r['steps']} B={r['batch']} {r['extra']['first_call_s']} s" for r in comp))
        out.append("- Roofline bound = max(bytes / DRAM bandwidth, FLOPs / peak); FLOPs and bytes from the fused graph's "
                   "matrix products (weights counted once per step); 'of bound' = bound / measured time.")
        out.append("")

    for group, title in (("encoders", "Encoders"), ("pipeline", "End-to-end in-process Pipeline")):
        rows = _rows(res, group)
        if not rows:
            continue
        out += [f"## {title}", ""]
        body = []
        for r in rows:
            ips = f"{r['items_per_s']:.3g}" if r.get("items_per_s") else "-"
            body.append([r["name"], r["backend"], r["precision"], str(r["batch"]), _fmt_ms(r), ips,
                         r["reason"] or r["extra"].get("note", "") or r["extra"].get("input", "")])
        out += [_table(["model", "backend", "precision", "B", "ms", "items/s", "note"], body), ""]

    for t in res.get("triton", []):
        out += [f"## Triton ensembles ({t['label']}{', ' + json.dumps(t['repository_options']) if t.get('repository_options') else ''})", ""]
        if t.get("error"):
            out += [f"Not measured: {t['error']}", ""]
            continue
        s = t.get("settings", {})
        out.append(f"perf_analyzer {t.get('perf_analyzer') or '(unavailable: ' + str(t.get('perf_analyzer_error')) + ')'}; "
                   f"stability: -p {s.get('measurement_interval_ms')} ms windows, -s {s.get('stability_percentage')} %, "
                   f"-r {s.get('max_trials')} windows (widened for 2 cores shared by client and server). Client-side latency; "
                   "'server queue / compute' = the composing models' mean per-request dynamic-batching wait and compute, "
                   "summed over the ensemble's steps, and 'mean executed batch' = inference_count / execution_count of each "
                   "composing model during the run (both from Triton's statistics: the CSV's own queue column is the "
                   "ensemble's, which never waits).")
        out.append("")
        body = []
        for run in t.get("runs", []):
            if run.get("status") != "ok":
                body.append([run.get("model", ""), run.get("protocol", ""), str(run.get("concurrency", "")), "failed", "", "", "", "", run.get("reason", "")])
                continue
            body.append([run["model"], run["protocol"], str(run["concurrency"]), f"{run['p50_ms']:.3g}", f"{run['p90_ms']:.3g}",
                         f"{run['p99_ms']:.3g}", f"{run['throughput_infer_s']:.3g}",
                         f"{run.get('steps_queue_ms', run.get('server_queue_ms', float('nan'))):.3g} / "
                         f"{run.get('steps_compute_ms', run.get('server_compute_infer_ms', float('nan'))):.3g}",
                         ("" if run.get("stable", True) else "unstable; ") + _batches(run)])
        out += [_table(["ensemble", "proto", "conc", "p50 ms", "p90 ms", "p99 ms", "infer/s", "server queue / compute ms", "note: mean executed batch"], body), ""]
        cmds = [run["command"] for run in t.get("runs", []) if run.get("command")]
        if cmds:
            out += ["Example command:", "", "```", cmds[0], "```", ""]

    if res.get("serving_load"):
        from .serving_load import load_markdown

        out += load_markdown(res["serving_load"])
    knobs = _rows(res, "knobs")
    if knobs:
        out += ["## Knobs tried (fused sampler, ORT CPU FP32)", ""]
        body = [[str(r["steps"]), str(r["batch"]), r["extra"].get("variant", ""), _fmt_ms(r)] for r in knobs]
        out += [_table(["K", "B", "variant", "ms"], body), ""]
    for t in res.get("knob_notes", []):
        out.append(f"- {t}")
    if res.get("knob_notes"):
        out.append("")

    from . import search

    out += search.markdown(res.get("search"))
    from . import generation

    out += generation.markdown(res.get("generation"))
    goals = goal_rows(res)
    out += ["## Goals", ""]
    body = [[g["goal"], g["target"], g["measured"], {True: "met", False: "**missed**", None: "not measured"}[g["met"]], g.get("why", "")]
            for g in goals]
    out += [_table(["goal", "target", "measured", "", "figures behind it"], body), ""]
    for n in res.get("notes", []):
        out.append(f"- {n}")
    out.append("")
    return "\n".join(out)


# ---- plots --------------------------------------------------------------------------------------
def plots(res: dict[str, Any], stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    st = res["settings"]

    def save(fig, suffix):
        path = stem.with_name(f"{stem.name}-{suffix}.png")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    den = _rows(res, "denoiser")
    if den:
        ks = st["steps"]
        fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4), squeeze=False)
        for ax, k in zip(axes[0], ks):
            for backend, prec, label in DENOISER_BACKENDS:
                pts = [(r["batch"], r["stats"]["median_ms"], r["stats"]["p10_ms"], r["stats"]["p90_ms"]) for r in den
                       if r["steps"] == k and r["backend"] == backend and r["precision"] == prec and r["status"] == "ok"]
                if pts:
                    pts.sort()
                    b, med, lo, hi = zip(*pts)
                    ax.errorbar(b, med, yerr=[[m - l for m, l in zip(med, lo)], [h - m for m, h in zip(med, hi)]],
                                marker="o", capsize=3, label=label)
            bounds = sorted({(r["batch"], r["extra"]["bound_ms"]) for r in den if r["steps"] == k and "bound_ms" in r["extra"]})
            if bounds:
                ax.plot(*zip(*bounds), "k--", label="roofline bound")
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(st["batches"]), [str(b) for b in st["batches"]])
            ax.set_yscale("log")
            ax.set_xlabel("batch B")
            ax.set_ylabel("latency per call (ms)")
            ax.set_title(f"fused sampler, K={k}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        save(fig, "denoiser-latency")

        roof = res.get("roofline", {})
        if roof:
            fig, ax = plt.subplots(figsize=(6, 4.5))
            import numpy as np

            xs = np.logspace(-1, 3, 100)
            ax.plot(xs, np.minimum(roof["peak_gflops"], xs * roof["bandwidth_gbs"]), "k-", label="roofline (DRAM)")
            if "cache_bandwidth_gbs" in roof:
                ax.plot(xs, np.minimum(roof["peak_gflops"], xs * roof["cache_bandwidth_gbs"]), "k:", label="roofline (cache bw)")
            for backend, prec, label in DENOISER_BACKENDS:
                pts = [(r["extra"]["intensity_flops_per_byte"], r["extra"]["achieved_gflops"]) for r in den
                       if r["backend"] == backend and r["precision"] == prec and "achieved_gflops" in r["extra"]]
                if pts:
                    ax.scatter(*zip(*pts), label=label, s=18)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("arithmetic intensity (FLOP/byte)")
            ax.set_ylabel("achieved GFLOP/s")
            ax.set_title("fused sampler vs this machine's roofline")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            save(fig, "roofline")

    for t in res.get("triton", []):
        runs = [r for r in t.get("runs", []) if r.get("status") == "ok"]
        if not runs:
            continue
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for model in sorted({r["model"] for r in runs}):
            for protocol in ("http", "grpc"):
                pts = sorted((r["concurrency"], r["p50_ms"], r["p99_ms"], r["throughput_infer_s"]) for r in runs
                             if r["model"] == model and r["protocol"] == protocol)
                if not pts:
                    continue
                c, p50, p99, thr = zip(*pts)
                line = a1.plot(c, p50, marker="o", label=f"{model} {protocol} p50")[0]
                a1.plot(c, p99, marker="x", ls="--", color=line.get_color(), label=f"{model} {protocol} p99")
                a2.plot(c, thr, marker="o", label=f"{model} {protocol}")
        a1.set_xlabel("concurrency")
        a1.set_ylabel("latency (ms)")
        a1.set_title("Triton latency vs concurrency")
        a2.set_xlabel("concurrency")
        a2.set_ylabel("throughput (infer/s)")
        a2.set_title("Triton throughput vs concurrency")
        concs = sorted({r["concurrency"] for r in runs})
        for a in (a1, a2):
            a.set_xscale("log", base=2)
            a.set_xticks(concs, [str(c) for c in concs])
            a.grid(True, alpha=0.3)
            a.legend(fontsize=7)
        save(fig, f"triton-{t['label']}")
    from . import search

    if search.plot(res.get("search") or {}, stem.with_name(f"{stem.name}-search.png")):
        written.append(stem.with_name(f"{stem.name}-search.png"))
    from . import generation

    if generation.plot(res.get("generation"), stem.with_name(f"{stem.name}-generation.png")):
        written.append(stem.with_name(f"{stem.name}-generation.png"))
    return written


def write_all(res: dict[str, Any], out_dir: Path, stem_name: str) -> dict[str, Any]:
    from diffgap.core.fsutil import atomic_write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / stem_name
    res["goals"] = goal_rows(res)
    md = markdown(res)
    files = {"json": str(stem.with_suffix(".json")), "markdown": str(stem.with_suffix(".md"))}
    pngs = plots(res, stem)
    files["plots"] = [str(p) for p in pngs]
    res["files"] = files
    atomic_write_json(stem.with_suffix(".json"), res)
    atomic_write_text(stem.with_suffix(".md"), md)
    return files


if __name__ == "__main__":  # rebuild markdown + plots from a saved JSON
    p = Path(sys.argv[1])
    r = json.loads(p.read_text())
    print(json.dumps(write_all(r, p.parent, p.stem), indent=2))
