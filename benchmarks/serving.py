"""Triton ensembles over HTTP and gRPC at concurrency 1, 2, 4, 8, measured with perf_analyzer.

perf_analyzer (Triton's standard load generator; the binary comes from
``benchmarks.perf_analyzer.perf_analyzer()``) runs once per (ensemble, protocol, concurrency) with
explicit stability settings: measurement windows of ``-p`` ms, "stable" when ``-s`` percent apart
over 3 windows, at most ``-r`` windows. perf_analyzer's defaults (5 s windows, 10 %, at most 10) do
not settle on a 2-core machine where client and server share the cores, so the windows are widened;
a run that still does not settle is retried once with a band twice as wide. The exact command,
whether it settled and whether it was retried are recorded per row. Latencies are client-side
(request sent to response received) p50/p90/p95/p99 and throughput in inferences/s; the server-side
split (queue / compute) comes from the same CSV.

Dynamic batching is evidenced by Triton's own statistics: ``inference_count / execution_count`` per
composing model over each run (the mean executed batch size).

Our own tritonclient closed-loop harness (:func:`client_load`) is used only where perf_analyzer cannot
run (no binary); those rows say so.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import os
import re
import shlex
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from .context import Context
from .pipeline import captions

log = logging.getLogger("benchmarks.serving")

# The ensembles timed; only those present in the generated repository run.
ENSEMBLES = ("text_to_audio_embedding", "audio_to_text_embedding", "text_to_audio_search")
PROTOCOLS = ("http", "grpc")


def stability_settings(quick: bool) -> dict[str, int]:
    """perf_analyzer -p (ms per window), -s (stability %), -r (max windows)."""
    if quick:
        # the smoke run proves the path works; it does not need settled figures
        return {"measurement_interval_ms": 1000, "stability_percentage": 100, "max_trials": 3}
    # 2 cores shared by client and server: a 25 % band (default 10 %) over 3 s windows, at most 6
    # windows (perf_analyzer's defaults: 10 %, 5 s, 10) -- 24 runs must fit in minutes, not an hour.
    return {"measurement_interval_ms": 3000, "stability_percentage": 25, "max_trials": 6}


# ---- repository --------------------------------------------------------------------------------
QUEUE_DELAY_KEY = "max_queue_delay_microseconds"


def build_repository(ctx: Context, out: Path, **options: Any) -> Path:
    """The portable repository of ``ctx.main_export`` (python-backend models running ORT on CPU).

    ``max_queue_delay_microseconds`` (a knob, not a generator option) rewrites that field in every
    generated ``config.pbtxt`` of this scratch copy.
    """
    from diffgap.triton_models.repository import build_repository as generate

    options = dict(options)
    delay = options.pop(QUEUE_DELAY_KEY, None)
    options.setdefault("index", gallery_index(ctx, out.parent / "gallery.npz"))
    repo = Path(generate(ctx.main_export, out, flavor="portable", **options))
    if delay is not None:
        for cfg in repo.glob("*/config.pbtxt"):
            text = cfg.read_text()
            new = re.sub(rf"{QUEUE_DELAY_KEY}\s*:\s*\d+", f"{QUEUE_DELAY_KEY}: {int(delay)}", text)
            if new != text:
                cfg.write_text(new)
    return repo


GALLERY = 1000  # gallery size of the search ensemble's index (random unit audio embeddings)


def gallery_index(ctx: Context, out: Path) -> Path:
    """A gallery index for ``text_to_audio_search``: random unit CLAP audio embeddings, ids clipNNNN."""
    from diffgap.core.manifest import Manifest
    from diffgap.runtime.pipeline import build_index

    if out.exists():
        return out
    n = 24 if ctx.quick else GALLERY
    rng = np.random.default_rng(0)
    audio = rng.standard_normal((n, Manifest.load(ctx.main_export).input_dim("audio"))).astype(np.float32)
    audio /= np.linalg.norm(audio, axis=1, keepdims=True)
    return build_index(ctx.main_export, out, audio=audio, ids=[f"clip{i:04d}" for i in range(n)])


def batching_knob(ctx: Context) -> dict[str, Any]:
    """The setting tried when the dynamic-batching goal is missed: a 10 ms batching window (more
    requests per executed batch at c=8; each model's ORT session keeps the default, one thread per core)."""
    return {QUEUE_DELAY_KEY: 10000}


# ---- input data --------------------------------------------------------------------------------
def _input_data(config: dict[str, Any], batch_text: str, wave_len_hint: int | None = None) -> dict[str, Any]:
    """perf_analyzer ``--input-data`` JSON for one request of ``config``'s required inputs (the
    optional ones, per-row seed and guidance, keep the models' defaults)."""
    entry: dict[str, Any] = {}
    for inp in config.get("input", []):
        if inp.get("optional"):
            continue
        dims = [int(d) for d in inp.get("dims", [])]
        shape = [1 if d < 0 else d for d in dims] or [1]
        n = int(np.prod(shape))
        dt = inp.get("data_type", "TYPE_FP32")
        if dt == "TYPE_STRING":
            content: list[Any] = [batch_text] * n
        elif dt in ("TYPE_FP32", "TYPE_FP16", "TYPE_FP64"):
            if dims and dims[-1] < 0 and wave_len_hint:
                shape = [wave_len_hint]
                n = wave_len_hint
            rng = np.random.default_rng(0)
            content = (0.1 * rng.standard_normal(n)).astype(np.float32).round(5).tolist()
        else:  # ints: seeds, k
            content = [0] * n if "seed" in inp["name"] else [5] * n
        entry[inp["name"]] = {"content": content, "shape": shape}
    return {"data": [entry]}


def _model_config(http_url: str, model: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/config", timeout=10) as r:
        return json.loads(r.read())


def _model_stats(http_url: str) -> dict[str, dict[str, int]]:
    """model -> Triton's cumulative counters: inferences, executions, and the request count and
    total ns of the queue and compute-infer phases (``/v2/models/stats``), all models."""
    with urllib.request.urlopen(f"http://{http_url}/v2/models/stats", timeout=10) as r:
        d = json.loads(r.read())
    out = {}
    for m in d.get("model_stats", []):
        st = m.get("inference_stats", {})
        out[m["name"]] = {
            "inferences": int(m.get("inference_count", 0)), "executions": int(m.get("execution_count", 0)),
            "queue_n": int(st.get("queue", {}).get("count", 0)), "queue_ns": int(st.get("queue", {}).get("ns", 0)),
            "compute_n": int(st.get("compute_infer", {}).get("count", 0)),
            "compute_ns": int(st.get("compute_infer", {}).get("ns", 0)),
        }
    return out


def _step_stats(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]], ensemble: str) -> dict[str, dict[str, float]]:
    """Per composing model over one run: mean executed batch (inferences / executions) and the mean
    per-request queue wait and compute-infer time in ms (Triton statistics)."""
    out = {}
    for m, a in after.items():
        b = before.get(m, {})
        d = {k: v - b.get(k, 0) for k, v in a.items()}
        if m == ensemble or d["executions"] <= 0:
            continue
        out[m] = {
            "batch": round(d["inferences"] / d["executions"], 3),
            "queue_ms": round(d["queue_ns"] / max(d["queue_n"], 1) / 1e6, 4),
            "compute_ms": round(d["compute_ns"] / max(d["compute_n"], 1) / 1e6, 4),
        }
    return out


# ---- perf_analyzer -----------------------------------------------------------------------------
_CSV_KEYS = {
    "Inferences/Second": "throughput_infer_s",
    "p50 latency": "p50_ms", "p90 latency": "p90_ms", "p95 latency": "p95_ms", "p99 latency": "p99_ms",
    "Avg latency": "avg_ms", "Server Queue": "server_queue_ms", "Server Compute Infer": "server_compute_infer_ms",
    "Server Compute Input": "server_compute_input_ms", "Server Compute Output": "server_compute_output_ms",
    "Client Send": "client_send_ms", "Client Recv": "client_recv_ms",
    "Network+Server Send/Recv": "network_server_ms",
}


def parse_perf_csv(text: str) -> list[dict[str, float]]:
    """perf_analyzer's ``-f`` CSV -> one dict per concurrency (latencies converted from us to ms)."""
    rows = []
    for rec in csv.DictReader(io.StringIO(text)):
        if not rec.get("Concurrency"):
            continue
        out: dict[str, float] = {"concurrency": int(float(rec["Concurrency"]))}
        for k, v in rec.items():
            if k in _CSV_KEYS and v not in (None, ""):
                val = float(v)
                out[_CSV_KEYS[k]] = val if k == "Inferences/Second" else val / 1e3
        rows.append(out)
    return rows


def run_perf_analyzer(
    binary: Path, env: dict[str, str], url: str, protocol: str, model: str, concurrency: int,
    input_json: Path, settings: dict[str, int], workdir: Path, timeout_s: float,
) -> dict[str, Any]:
    csv_path = workdir / f"pa-{model}-{protocol}-c{concurrency}.csv"
    cmd = [
        str(binary), "-m", model, "-u", url, "-i", protocol,
        "--concurrency-range", f"{concurrency}:{concurrency}",
        "--input-data", str(input_json),
        "-p", str(settings["measurement_interval_ms"]),
        "-s", str(settings["stability_percentage"]),
        "-r", str(settings["max_trials"]),
        "-f", str(csv_path),
    ]
    rec: dict[str, Any] = {"tool": "perf_analyzer", "protocol": protocol, "model": model, "concurrency": concurrency,
                           "command": shlex.join(cmd), "settings": dict(settings)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        rec.update(status="failed", reason=f"perf_analyzer did not finish within {timeout_s:.0f} s")
        return rec
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    out = proc.stdout + proc.stderr
    rec["stable"] = "Failed to obtain stable measurement" not in out
    if proc.returncode != 0 or not csv_path.exists():
        lines = [l for l in out.strip().splitlines() if l.strip()]
        rec.update(status="failed", reason=(lines[-1] if lines else f"exit {proc.returncode}")[:300])
        rec["stdout_tail"] = "\n".join(lines[-15:])
        return rec
    parsed = parse_perf_csv(csv_path.read_text())
    if not parsed:
        rec.update(status="failed", reason="perf_analyzer wrote an empty CSV")
        return rec
    rec.update(parsed[0])
    rec["status"] = "ok"
    if not rec["stable"]:
        rec["note"] = "did not settle within the stability band; figures are the last window's"
    return rec


# ---- fallback: our own closed-loop client ------------------------------------------------------
def client_load(url: str, protocol: str, model: str, config: dict[str, Any], concurrency: int,
                duration_s: float, text: str) -> dict[str, Any]:
    """C threads, each sending one request after the previous answer, for ``duration_s``."""
    if protocol == "grpc":
        import tritonclient.grpc as tc
    else:
        import tritonclient.http as tc
    lat: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + duration_s
    errors: list[str] = []

    def make_inputs():
        ins = []
        for inp in config.get("input", []):
            if inp.get("optional"):
                continue
            if inp["data_type"] != "TYPE_STRING":
                raise ValueError(f"client_load sends text only; {model} input {inp['name']} is {inp['data_type']}")
            arr = np.array([[text.encode()]], dtype=np.object_)
            x = tc.InferInput(inp["name"], list(arr.shape), "BYTES")
            x.set_data_from_numpy(arr)
            ins.append(x)
        return ins

    def worker():
        client = tc.InferenceServerClient(url)
        ins = make_inputs()
        try:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                client.infer(model, ins)
                with lock:
                    lat.append(time.perf_counter() - t0)
        except Exception as e:  # recorded, not raised: a failing client is a result
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            client.close()

    t_start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    if errors and not lat:
        return {"status": "failed", "reason": errors[0][:300]}
    a = np.asarray(lat) * 1e3
    return {
        "status": "ok", "tool": "tritonclient closed loop (perf_analyzer unavailable)",
        "throughput_infer_s": len(lat) / wall, "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)), "p95_ms": float(np.percentile(a, 95)),
        "p99_ms": float(np.percentile(a, 99)), "avg_ms": float(a.mean()), "requests": len(lat),
        "errors": len(errors),
    }


# ---- the group ---------------------------------------------------------------------------------
def _perf_analyzer() -> tuple[Path | None, dict[str, str], str]:
    try:
        from .perf_analyzer import perf_analyzer

        binary, env = perf_analyzer()
        return binary, env, ""
    except Exception as e:  # recorded; the fallback harness takes over
        return None, dict(os.environ), f"{type(e).__name__}: {e}"


def _timeout_s(settings: dict[str, int]) -> float:
    """Every window perf_analyzer may take, three times over, plus a minute for start-up."""
    return 60 + 3 * settings["measurement_interval_ms"] / 1e3 * settings["max_trials"]


def perf_analyzer_run(binary: Path, env: dict[str, str], url: str, protocol: str, model: str, concurrency: int,
                      input_json: Path, settings: dict[str, int], workdir: Path) -> dict[str, Any]:
    """One perf_analyzer measurement; one retry with a stability band twice as wide when the first
    did not settle (perf_analyzer then exits non-zero: ``stable`` is False in its record)."""
    args = (binary, env, url, protocol, model, concurrency, input_json)
    rec = run_perf_analyzer(*args, settings, workdir, timeout_s=_timeout_s(settings))
    if rec["status"] != "ok" and rec.get("stable") is False:
        wide = {**settings, "stability_percentage": min(100, 2 * settings["stability_percentage"])}
        first = rec.get("reason", "")
        rec = run_perf_analyzer(*args, wide, workdir, timeout_s=_timeout_s(wide))
        rec["retried"] = f"first attempt did not settle within {settings['stability_percentage']} % ({first})"
    rec["optional_inputs_sent"] = False
    return rec


def _add_step_stats(rec: dict[str, Any], before: dict[str, dict[str, int]], after: dict[str, dict[str, int]], model: str) -> None:
    steps = _step_stats(before, after, model)
    rec["steps"] = steps
    rec["mean_batch"] = {m: v["batch"] for m, v in steps.items()}
    # The CSV's "Server Queue" is the ensemble's own (~0): the composing models' dynamic batching
    # waits are only in Triton's per-model statistics.
    rec["steps_queue_ms"] = round(sum(v["queue_ms"] for v in steps.values()), 4)
    rec["steps_compute_ms"] = round(sum(v["compute_ms"] for v in steps.values()), 4)


def _log_run(rec: dict[str, Any], model: str, protocol: str, conc: int) -> None:
    log.info(
        "triton %-26s %-4s c=%d: %s", model, protocol, conc,
        f"p50 {rec['p50_ms']:.2f} ms, p99 {rec['p99_ms']:.2f} ms, {rec['throughput_infer_s']:.1f} infer/s, "
        f"batches {rec['mean_batch']}" if rec.get("status") == "ok" else f"failed: {rec.get('reason')}",
    )


def run(ctx: Context, repo_options: dict[str, Any] | None = None, label: str = "default",
        ensembles: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Start the server on a fresh portable repository, load every ensemble; return the records."""
    from diffgap.triton_models.server import TritonServer

    work = ctx.work / f"triton-{label}"
    work.mkdir(parents=True, exist_ok=True)
    repo = build_repository(ctx, work / "repository", **(repo_options or {}))
    binary, env, pa_error = _perf_analyzer()
    settings = stability_settings(ctx.quick)
    result: dict[str, Any] = {
        "label": label, "repository_options": dict(repo_options or {}), "settings": settings,
        "perf_analyzer": str(binary) if binary else None, "perf_analyzer_error": pa_error or None, "runs": [],
    }
    text = captions(1)[0]
    with TritonServer(repo) as server:
        result["server"] = {"pid": server.pid, "http": server.http_url, "grpc": server.grpc_url}
        wanted = ensembles or (ENSEMBLES[:1] if ctx.quick else ENSEMBLES)
        present = result["ensembles"] = [m for m in wanted if m in server.models]
        configs = {m: _model_config(server.http_url, m) for m in present}
        inputs = {m: work / f"input-{m}.json" for m in present}
        for m, path in inputs.items():
            path.write_text(json.dumps(_input_data(configs[m], text)))
        for model, protocol, conc in itertools.product(present, PROTOCOLS, ctx.concurrency):
            url = server.http_url if protocol == "http" else server.grpc_url
            before = _model_stats(server.http_url)
            if binary is not None:
                rec = perf_analyzer_run(binary, env, url, protocol, model, conc, inputs[model], settings, work)
            else:
                rec = client_load(url, protocol, model, configs[model], conc, 3.0 if ctx.quick else 20.0, text)
                rec.update(protocol=protocol, model=model, concurrency=conc, fallback_reason=pa_error)
            _add_step_stats(rec, before, _model_stats(server.http_url), model)
            _log_run(rec, model, protocol, conc)
            result["runs"].append(rec)
    return result
