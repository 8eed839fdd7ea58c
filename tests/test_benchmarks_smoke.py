"""Smoke test of the benchmark entry points (benchmarks/): each runs once at --quick sizes.

Benchmarks are not tests: nothing here looks at a time. What is checked is that every entry point
still runs end to end against the real export, runtime, Triton server and perf_analyzer, and writes
what it promises (JSON with every group, markdown with the goals table, PNG plots), so the benchmark
code cannot rot between full runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("denoiser", "encoders", "pipeline", "knobs")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One full ``python -m benchmarks --quick`` run (all groups); returns (out dir, results dict)."""
    out = tmp_path_factory.mktemp("bench-out")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--no-cache", "--out", str(out)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, f"benchmarks --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    results = sorted(out.glob("*-quick.json"))
    assert len(results) == 1, f"expected one results json in {out}, found {[p.name for p in out.iterdir()]}"
    return out, json.loads(results[0].read_text()), proc.stdout


def test_results_files(quick):
    out, res, stdout = quick
    assert res["schema"] == "diffgap-bench/1"
    files = res["files"]  # names beside the JSON: results name no machine directory
    assert (out / files["json"]).is_file() and (out / files["markdown"]).is_file()
    pngs = [out / p for p in files["plots"]]
    names = {p.name.rsplit("-", 1)[-1] for p in pngs}
    assert {"latency.png", "roofline.png", "default.png"} <= names, names
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"
    md = (out / files["markdown"]).read_text()
    assert "## Goals" in md and "## Roofline" in md
    assert "## Goals" in stdout  # the CLI prints the report


def test_machine_and_roofline_recorded(quick):
    _, res, _ = quick
    m = res["machine"]
    for key in ("cpu_model", "logical_cpus", "threads_used", "versions", "loadavg_start"):
        assert m.get(key) is not None, key
    assert "onnxruntime" in m["versions"] or "onnxruntime-gpu" in m["versions"]
    roof = res["roofline"]
    assert roof["peak_gflops"] > 0 and roof["bandwidth_gbs"] > 0


def test_every_group_ran(quick):
    _, res, _ = quick
    rows = res["rows"]
    for group in GROUPS:
        assert any(r["group"] == group for r in rows), f"no {group} rows"
    for r in rows:
        # A backend that cannot run here is recorded with its reason; only torch.compile (toolchain
        # dependent) and TensorRT (GPU only) may be absent. Everything else must have run.
        if r["status"] != "ok":
            assert r["reason"], r
            assert r["backend"].startswith(("tensorrt", "torch-compile")), f"{r['group']} {r['name']} {r['backend']}: {r['reason']}"
        else:
            s = r["stats"]
            assert s["n"] >= 3 and s["p10_ms"] <= s["median_ms"] <= s["p90_ms"]


def test_denoiser_rows_cover_grid_with_roofline(quick):
    _, res, _ = quick
    st = res["settings"]
    den = [r for r in res["rows"] if r["group"] == "denoiser"]
    for k in st["steps"]:
        for b in st["batches"]:
            got = {(r["backend"], r["precision"]) for r in den if r["steps"] == k and r["batch"] == b}
            assert {("torch-eager", "fp32"), ("torch-compile", "fp32"), ("ort-cpu", "fp32"), ("ort-cpu", "fp16-graph"),
                    ("tensorrt", "fp16"), ("tensorrt+cuda-graph", "fp16")} <= got, (k, b, got)
            ort = next(r for r in den if r["steps"] == k and r["batch"] == b and r["backend"] == "ort-cpu" and r["precision"] == "fp32")
            ex = ort["extra"]
            assert ex["flops"] > 0 and ex["bytes"] > 0 and ex["bound_ms"] > 0 and ex["bound_by"] in ("memory", "compute")
            assert "roofline_fraction" in ex


def test_triton_ran_over_http_and_grpc(quick):
    _, res, _ = quick
    (tri, *_rest) = res["triton"]
    assert not tri.get("error"), tri.get("error")
    runs = [r for r in tri["runs"] if r["model"] == "text_to_audio_embedding"]
    assert {(r["protocol"], r["concurrency"]) for r in runs} == {(p, c) for p in ("http", "grpc") for c in res["settings"]["concurrency"]}
    for r in runs:
        assert r["status"] == "ok", (r.get("reason"), r.get("stdout_tail"))
        assert r["p50_ms"] > 0 and r["throughput_infer_s"] > 0
        # per composing model, from Triton's statistics: batch, queue wait, compute
        assert {"clap_tokenizer", "clap_text_encoder"} <= set(r["steps"])
        assert all(v["batch"] >= 1 and v["queue_ms"] >= 0 and v["compute_ms"] > 0 for v in r["steps"].values())
        if r.get("tool") == "perf_analyzer":
            assert "perf_analyzer" in r["command"] and "-s" in r["command"]


def test_goals_table(quick):
    _, res, _ = quick
    goals = res["goals"]
    # speed-up, roofline, overhead (2 ensembles x 2 protocols), batching (2 protocols)
    assert len(goals) == 8
    # "met" must follow from the measured value and the stated target: a goal reported met whose value
    # misses the target (or the reverse), or a measured goal without a verdict, is a reporting bug.
    thresholds = {">= 4.0x": lambda v: v >= 4.0, "bound / time >= 0.50": lambda v: v >= 0.5, "<= +10%": lambda v: v <= 0.10}
    for g in goals:
        assert g["target"] in thresholds, g
        if g.get("value") is None:
            assert g["met"] is None and g["measured"] == "not measured", g
        else:
            assert g["met"] is thresholds[g["target"]](g["value"]), g
    assert any(g.get("value") is not None for g in goals), "the quick run measured no goal at all"


def test_report_rebuilds_from_json(quick, tmp_path):
    out, res, _ = quick
    saved = out / res["files"]["json"]
    copy = tmp_path / saved.name
    copy.write_text(saved.read_text())
    proc = subprocess.run([sys.executable, "-m", "benchmarks.report", str(copy)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert copy.with_suffix(".md").is_file()
    assert list(tmp_path.glob("*.png"))


def test_bad_arguments_exit_2(tmp_path):
    for argv in (["--only", "nonsense"], ["--export-dir", str(tmp_path / "missing")], ["--steps", "0"], ["--preset", "no-such-preset"]):
        proc = subprocess.run([sys.executable, "-m", "benchmarks", "--out", str(tmp_path), *argv], cwd=REPO, env=_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "error" in proc.stderr


def test_generation_group(quick):
    """The bridge-vs-generation group ran both sides in the same run and reports the bridge's share."""
    out, res, _ = quick
    gen = res["generation"]
    assert gen["unet_parameters"] > 0 and gen["config_source"]
    assert {r["name"] for r in gen["rows"] if r["status"] == "ok"} >= {"generator-denoising-loop", "bridge-sampler"}
    share = gen["summary"]["ort-cpu"]["share_of_generation"]
    assert 0.0 < share < 1.0
    assert "## Bridge cost against one generation" in (out / res["files"]["markdown"]).read_text()
    assert any(p.endswith("-generation.png") for p in res["files"]["plots"])


@pytest.fixture(scope="module")
def train_step(tmp_path_factory):
    """``python -m benchmarks --quick --only train-step`` on its own (seconds: no export is needed)."""
    out = tmp_path_factory.mktemp("bench-train-step")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "train-step", "--out", str(out)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"benchmarks --only train-step failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    (path,) = out.glob("*-quick.json")
    return out, json.loads(path.read_text())


def test_train_step_group(train_step):
    """Both variants stepped both stages of the default preset, in one run, and did the same updates."""
    from diffgap.config import DEFAULT_PRESET

    out, res = train_step
    ts = res["train_step"]
    assert ts["preset"] == DEFAULT_PRESET and ts["torch_threads"] >= 1
    assert set(ts["variants"]) == {"foreach-off", "package"}
    assert [r["stage"] for r in ts["rows"]] == ["denoisers", "heads"]
    for r in ts["rows"]:
        assert "error" not in r, r
        assert set(r["variants"]) == {"foreach-off", "package"}
        # taking turns: every round timed one step of each
        assert r["variants"]["foreach-off"]["n"] == r["variants"]["package"]["n"] >= 3
        for v in r["variants"].values():
            assert v["p10_ms"] <= v["median_ms"] <= v["p90_ms"] and v["steps_per_s"] > 0
            assert v["last_loss"] == v["last_loss"]  # finite, not NaN
        assert r["ratio"] > 0 and r["paired_ratio"] > 0
        # the optimiser moved the stage's parameters, and both implementations moved them alike: a
        # variant that skipped its step (or stepped other parameters) leaves a difference of the
        # size of the change itself
        assert r["max_param_change"] > 0
        assert r["max_param_diff"] < 1e-2 * r["max_param_change"], (r["max_param_diff"], r["max_param_change"])
    md = (out / res["files"]["markdown"]).read_text()
    assert "## Training step: optimiser and EMA implementations" in md and "foreach-off / package" in md
    (png,) = [p for p in res["files"]["plots"] if p.endswith("-train-step.png")]
    assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
