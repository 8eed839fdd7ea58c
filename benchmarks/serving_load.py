"""Sustained load on the served text and audio ensembles through the nginx proxy, malformed requests
mixed in: no wrong answer, no lost request, every malformed one refused as documented, p99 reported.

:func:`sustained_load` is the harness (the tests run a short version of it); :func:`run_load` is the
``make bench`` entry: 8 clients for 60 s on the portable repository behind
:class:`diffgap.triton_models.proxy.ProxiedServer`, the layout ``diffgap serve`` runs.
Clients are closed loops (one request in flight each), half over HTTP and half over gRPC; the valid
requests come from a fixed pool whose answers the in-process runtime computed beforehand.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .context import Context
from .serving import PROTOCOLS, build_repository

log = logging.getLogger("benchmarks.serving_load")


LOAD_ENSEMBLES = ("text_to_audio_embedding", "audio_to_text_embedding")
LOAD_TOL = 1e-5  # max abs vs the in-process runtime (same ONNX graphs on onnxruntime CPU, same noise)
LOAD_CAPTIONS = ("a dog barks in the distance", "rain falling on a tin roof", "Ünïcödé café & jazz, 3 saxophones",
                 "a cat purrs")
LOAD_SEEDS = (0, 1, 2, 3)


def _load_pool(export: Path, n_waves: int = 3):
    """(valid requests with their in-process answers, malformed requests with the words of their
    documented error), for the text and audio ensembles. A request is (ensemble, [(name, array)])."""
    from diffgap.runtime import AudioToTextBridge, TextToAudioBridge
    from diffgap.triton_models import repository as R

    valid, bad = [], []
    t2a, a2t = LOAD_ENSEMBLES
    seed_arr = lambda s: np.array([[s]], np.int64)  # noqa: E731
    text_arr = lambda t: np.array([[t]], dtype=object)  # noqa: E731
    with TextToAudioBridge(export) as bridge:
        for cap in LOAD_CAPTIONS:
            for s in LOAD_SEEDS:
                valid.append(((t2a, [(R.TEXT, text_arr(cap.encode())), (R.SEED, seed_arr(s))]), bridge([cap], seed=[s]).bridged))
    with AudioToTextBridge(export) as bridge:
        spec = bridge.encoder.io.inputs[0]
        rng = np.random.default_rng(3)
        for w in range(n_waves):
            wav = rng.uniform(-0.5, 0.5, spec.concrete(1)).astype(spec.np_dtype)
            for s in LOAD_SEEDS[:2]:
                valid.append(((a2t, [(spec.name, wav), (R.SEED, seed_arr(s))]), bridge(wav, seed=[s]).bridged))
        nan = wav.copy()
        nan[0, 7] = np.nan
        bad += [
            ((a2t, [(spec.name, nan)]), ("nan",)),
            ((a2t, [(spec.name, wav[:, :-1].copy())]), ("shape",)),
            ((a2t, [(spec.name, wav.astype(np.float64))]), ("data-type", "datatype")),
            ((a2t, [(spec.name, wav), (R.SEED, seed_arr(-1))]), ("non-negative",)),
        ]
    bad += [
        ((t2a, [(R.TEXT, text_arr(b""))]), ("empty caption",)),
        ((t2a, [(R.TEXT, text_arr(b"caf\xe9 \xff"))]), ("utf-8",)),
        ((t2a, [(R.TEXT, text_arr(b"x" * (R.MAX_TEXT_BYTES + 1)))]), ("exceeds the limit",)),
        ((t2a, [(R.TEXT, text_arr(b"a dog")), (R.SEED, seed_arr(-5))]), ("non-negative",)),
    ]
    return valid, bad


def _infer_inputs(tc, tensors):
    from tritonclient.utils import np_to_triton_dtype

    out = []
    for name, arr in tensors:
        x = tc.InferInput(name, list(arr.shape), "BYTES" if arr.dtype == object else np_to_triton_dtype(arr.dtype))
        x.set_data_from_numpy(arr)
        out.append(x)
    return out


def sustained_load(http_url: str, grpc_url: str, export: Path, clients: int = 8, duration_s: float = 60.0,
                   bad_fraction: float = 0.1, seed: int = 0, request_timeout_s: float = 120.0) -> dict[str, Any]:
    """``clients`` closed-loop clients (half HTTP, half gRPC) for ``duration_s`` on the text and audio
    ensembles, a ``bad_fraction`` of the requests malformed (every ``1 / bad_fraction``-th of each client).

    Every valid answer is compared with the in-process runtime's (``wrong`` counts mismatches and
    valid requests refused); every malformed one must be refused with HTTP 400 / gRPC
    INVALID_ARGUMENT and its documented message (``undocumented`` counts the others); ``lost``
    counts requests that got no answer at all (connection errors, timeouts). Latency percentiles are
    over the valid requests, per ensemble and overall.
    """
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from diffgap.triton_models import repository as R

    valid, bad = _load_pool(export)
    lock = threading.Lock()
    counts = {"sent": 0, "valid": 0, "correct": 0, "wrong": 0, "malformed": 0, "refused_as_documented": 0,
              "undocumented": 0, "lost": 0}
    latency: dict[str, list[float]] = {m: [] for m in LOAD_ENSEMBLES}
    examples: list[str] = []
    stop = time.perf_counter() + duration_s

    def note(key: str, example: str | None = None) -> None:
        with lock:
            counts[key] += 1
            if example and len(examples) < 10:
                examples.append(example)

    def worker(c: int) -> None:
        protocol = PROTOCOLS[c % 2]
        tc = httpclient if protocol == "http" else grpcclient
        client = (httpclient.InferenceServerClient(http_url, network_timeout=request_timeout_s, connection_timeout=request_timeout_s)
                  if protocol == "http" else grpcclient.InferenceServerClient(grpc_url))
        rng = np.random.default_rng(seed * 1000 + c)
        period = max(1, round(1 / bad_fraction)) if bad_fraction > 0 else 0
        i = 0
        try:
            while time.perf_counter() < stop:
                # every period-th request of each client is malformed (offset per client): the mix is exact
                # even in a short run, and which malformed / valid request is drawn at random
                is_bad = bool(period) and (i + c) % period == 0
                i += 1
                (model, tensors), want = (bad if is_bad else valid)[rng.integers(len(bad if is_bad else valid))]
                with lock:
                    counts["sent"] += 1
                    counts["malformed" if is_bad else "valid"] += 1
                kw = {} if protocol == "http" else {"client_timeout": request_timeout_s}
                t0 = time.perf_counter()
                try:
                    result = client.infer(model, _infer_inputs(tc, tensors), **kw)
                except InferenceServerException as e:
                    status, msg = str(e.status()), str(e)
                    if status in ("400", "StatusCode.INVALID_ARGUMENT") and is_bad and any(w in msg.lower() for w in want):
                        note("refused_as_documented")
                    elif status in ("None", "StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"):
                        note("lost", f"{protocol} {model}: {status} {msg[:200]}")
                    else:
                        note("undocumented" if is_bad else "wrong", f"{protocol} {model}: {status} {msg[:200]}")
                    continue
                except Exception as e:  # noqa: BLE001 - no answer at all: counted as lost
                    note("lost", f"{protocol} {model}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                dt = time.perf_counter() - t0
                if is_bad:
                    note("undocumented", f"{protocol} {model}: a malformed request was answered 200")
                    continue
                got = result.as_numpy(R.OUTPUTS["bridged"])
                err = float(np.max(np.abs(got.astype(np.float64) - want))) if got is not None and got.shape == want.shape else np.inf
                with lock:
                    latency[model].append(dt)
                note("correct" if err <= LOAD_TOL else "wrong", None if err <= LOAD_TOL else f"{protocol} {model}: max abs {err:.3g}")
        finally:
            client.close()

    t_start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration_s + 2 * request_timeout_s)
    wall = time.perf_counter() - t_start
    hung = sum(t.is_alive() for t in threads)
    counts["lost"] += hung  # a client still waiting for its answer
    counts["unanswered"] = counts["sent"] - sum(counts[k] for k in ("correct", "wrong", "refused_as_documented", "undocumented", "lost"))

    def pct(xs: list[float]) -> dict[str, float]:
        if not xs:
            return {}
        a = np.asarray(xs) * 1e3
        return {"n": len(xs), "p50_ms": round(float(np.percentile(a, 50)), 2), "p90_ms": round(float(np.percentile(a, 90)), 2),
                "p99_ms": round(float(np.percentile(a, 99)), 2), "max_ms": round(float(a.max()), 2)}

    return {
        "clients": clients, "duration_s": duration_s, "wall_s": round(wall, 1), "bad_fraction": bad_fraction,
        "protocols": "clients alternate HTTP / gRPC", "ensembles": list(LOAD_ENSEMBLES), **counts,
        "throughput_req_s": round(counts["sent"] / wall, 1),
        "latency": {"all": pct([x for v in latency.values() for x in v]), **{m: pct(v) for m, v in latency.items()}},
        "examples": examples,
    }


def run_load(ctx: Context, clients: int = 8, duration_s: float | None = None) -> dict[str, Any]:
    """:func:`sustained_load` on the portable repository behind the nginx proxy (``diffgap serve``'s
    layout); 60 s (3 s with ``--quick``). A failure to start is a recorded result."""
    from diffgap.triton_models.proxy import ProxiedServer

    duration_s = duration_s if duration_s is not None else (3.0 if ctx.quick else 60.0)
    work = ctx.work / "triton-load"
    work.mkdir(parents=True, exist_ok=True)
    try:
        repo = build_repository(ctx, work / "repository")
        with ProxiedServer(repo) as server:
            rec = sustained_load(server.http_url, server.grpc_url, ctx.main_export, clients=clients, duration_s=duration_s)
            client = server.http_client()
            rec["alive_after"] = bool(client.is_server_live() and client.is_server_ready() and server.running())
            rec["limits"] = server.limits.describe()
    except Exception as e:  # noqa: BLE001 - recorded, the other groups' results still get written
        log.warning("sustained load not measured: %s: %s", type(e).__name__, e)
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    log.info("sustained load: %d requests, %d wrong, %d lost, %d undocumented, p99 %s ms", rec["sent"], rec["wrong"],
             rec["lost"], rec["undocumented"], rec["latency"]["all"].get("p99_ms"))
    return rec


def load_markdown(rec: dict[str, Any]) -> list[str]:
    """The sustained-load section of the benchmark report."""
    out = ["## Sustained load through the proxy (malformed requests mixed in)", ""]
    if rec.get("error"):
        return out + [f"not measured: {rec['error']}", ""]
    out.append(f"{rec['clients']} closed-loop clients ({rec['protocols']}) for {rec['duration_s']:.0f} s on "
               f"{', '.join(rec['ensembles'])}; {100 * rec['bad_fraction']:.0f} % malformed. Limits: {rec.get('limits', '-')}.")
    out += ["", "| requests | valid | correct | wrong | malformed | refused as documented | undocumented | lost | req/s | server alive after |",
            "|---|---|---|---|---|---|---|---|---|---|",
            f"| {rec['sent']} | {rec['valid']} | {rec['correct']} | {rec['wrong']} | {rec['malformed']} | "
            f"{rec['refused_as_documented']} | {rec['undocumented']} | {rec['lost']} | {rec['throughput_req_s']} | {rec.get('alive_after')} |",
            "", "| valid requests | n | p50 ms | p90 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
    for k, v in rec["latency"].items():
        if v:
            out.append(f"| {k} | {v['n']} | {v['p50_ms']} | {v['p90_ms']} | {v['p99_ms']} | {v['max_ms']} |")
    return out + [""]
