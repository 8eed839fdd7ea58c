"""The portable Triton repository on the real tritonserver (nvidia-pytriton's bundled 2.51.0 binary).

One server per module, on 127.0.0.1 with free ports, always stopped. Its python models run with
``import torch`` made to fail (a blocker package first on PYTHONPATH), so a served repository is
proven torch-free. Expected values come from the in-process runtime (diffgap.runtime) on the same
export directory; the served result must equal it within 1e-5 (max abs): both run the same ONNX
graphs on onnxruntime CPU with the same noise, the only difference being how rows are batched.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

import triton_fixtures
from diffgap.core.iospec import ROLE_CONDITION, ROLE_GUIDANCE, ROLE_NOISE
from diffgap.core.manifest import Manifest
from diffgap.runtime import AudioSearch, AudioToTextBridge, TextToAudioBridge
from diffgap.triton_models import repository as R
from diffgap.triton_models.server import TritonServer

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

TOL = 1e-5  # max abs: the same ONNX graphs on onnxruntime CPU with the same noise, batched differently
K = 5
TEXTS = ["a dog barks in the distance", "rain falling on a tin roof", "Ünïcödé café & jazz, 3 saxophones"]
PROTOCOLS = ("http", "grpc")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """(export dir, index path, repository path)."""
    export = triton_fixtures.shared_export(tmp_path_factory)
    index = triton_fixtures.shared_index(tmp_path_factory)
    repo = R.build_repository(export, tmp_path_factory.mktemp("triton") / "repo", flavor="portable", index=index, top_k=K)
    return export, index, repo


@pytest.fixture(scope="module")
def server(env, tmp_path_factory):
    srv = TritonServer(env[2], cwd=triton_fixtures.torch_blocker(tmp_path_factory.mktemp("notorch")))
    with srv:
        yield srv
    assert not srv.running()


def _client(server, protocol):
    return server.http_client() if protocol == "http" else server.grpc_client()


def _mod(protocol):
    return httpclient if protocol == "http" else grpcclient


def _text_input(protocol, texts, name=R.TEXT):
    arr = np.array([[t.encode("utf-8")] for t in texts], dtype=object)
    x = _mod(protocol).InferInput(name, list(arr.shape), "BYTES")
    x.set_data_from_numpy(arr)
    return x


def _array_input(protocol, name, arr, dtype=None):
    from tritonclient.utils import np_to_triton_dtype

    x = _mod(protocol).InferInput(name, list(arr.shape), dtype or np_to_triton_dtype(arr.dtype))
    x.set_data_from_numpy(arr)
    return x


def _seed_input(protocol, seeds):
    return _array_input(protocol, R.SEED, np.asarray(seeds, dtype=np.int64).reshape(-1, 1))


def _maxabs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _assert_bridge(result, ref):
    for role, field in (("clap", "source"), ("projected", "projected"), ("bridged", "bridged")):
        got = result.as_numpy(R.OUTPUTS[role])
        want = getattr(ref, field)
        assert got.shape == want.shape and got.dtype == np.float32, role
        assert _maxabs(got, want) <= TOL, f"{role}: max abs {_maxabs(got, want):.3g} > {TOL}"


# ------------------------------------------------------------------------------------------------
def test_every_model_is_ready_with_torch_blocked(server, env):
    client = server.http_client()
    index = {m["name"]: m.get("state") for m in client.get_model_repository_index()}
    assert set(index) == set(R.read_repository_info(env[2])["models"])
    assert all(state == "READY" for state in index.values()), index
    assert server.http_url.startswith("127.0.0.1:") and server.grpc_url.startswith("127.0.0.1:")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_text_to_audio_embedding_matches_runtime(server, env, protocol):
    export = env[0]
    client = _client(server, protocol)
    seeds = [0, 7, 123]
    with TextToAudioBridge(export) as bridge:
        ref_seeded = bridge(TEXTS, seed=seeds)
        ref_default = bridge(TEXTS)
        ref_guided = bridge(TEXTS, seed=seeds, guidance_scale=1.5)
    _assert_bridge(client.infer(R.embedding_ensemble("text", "audio"), [_text_input(protocol, TEXTS), _seed_input(protocol, seeds)]), ref_seeded)
    _assert_bridge(client.infer(R.embedding_ensemble("text", "audio"), [_text_input(protocol, TEXTS)]), ref_default)
    g = Manifest.load(export).model(R.sampler_name("text", "audio")).io.role(ROLE_GUIDANCE)
    guide = _array_input(protocol, g.name, np.full(g.concrete(len(TEXTS)), 1.5, g.np_dtype))
    _assert_bridge(client.infer(R.embedding_ensemble("text", "audio"),
                                [_text_input(protocol, TEXTS), _seed_input(protocol, seeds), guide]), ref_guided)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_audio_to_text_embedding_matches_runtime(server, env, protocol):
    export = env[0]
    client = _client(server, protocol)
    with AudioToTextBridge(export) as bridge:
        spec = bridge.encoder.io.inputs[0]
        wav = np.random.default_rng(3).uniform(-0.5, 0.5, spec.concrete(2)).astype(spec.np_dtype)
        ref = bridge(wav, seed=[5, 6])
    result = client.infer(R.embedding_ensemble("audio", "text"), [_array_input(protocol, spec.name, wav), _seed_input(protocol, [5, 6])])
    _assert_bridge(result, ref)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_text_to_audio_search_matches_runtime(server, env, protocol):
    export, index, _ = env
    client = _client(server, protocol)
    seeds = [0, 1, 2]
    with AudioSearch(index, export) as search:
        ref_ids, ref_scores = search.search(TEXTS, k=K, seed=seeds)
    result = client.infer(R.SEARCH_ENSEMBLE, [_text_input(protocol, TEXTS), _seed_input(protocol, seeds)])
    ids = result.as_numpy(R.SEARCH_IDS).astype(str)
    np.testing.assert_array_equal(ids, ref_ids)
    assert _maxabs(result.as_numpy(R.SEARCH_SCORES), ref_scores) <= TOL


# -- bad requests ----------------------------------------------------------------------------------
def _bad_requests(env, protocol):
    """name -> (model, inputs, requested outputs or None, expected words in the error)."""
    man = Manifest.load(env[0])
    smp = man.model(R.sampler_name("text", "audio")).io
    cond, noise = smp.role(ROLE_CONDITION), smp.role(ROLE_NOISE)
    max_batch = min(m.io.max_batch for m in man.models.values() if m.io.name in
                    (R.encoder_name("text"), R.sampler_name("text", "audio")))
    ok_noise = np.zeros(noise.concrete(1), np.float32)
    nan_cond = np.ones(cond.concrete(1), np.float32)
    nan_cond[0, 1] = np.nan
    t2a = R.embedding_ensemble("text", "audio")
    return {
        "wrong dtype": (smp.name, [_array_input(protocol, cond.name, np.ones(cond.concrete(1), np.float64)),
                                   _array_input(protocol, noise.name, ok_noise)], None, "data"),
        "wrong seed dtype": (t2a, [_text_input(protocol, TEXTS[:1]), _array_input(protocol, R.SEED, np.ones((1, 1), np.float32))], None, "data"),
        "wrong shape": (smp.name, [_array_input(protocol, cond.name, np.ones((1, cond.feature_shape[0] + 1), np.float32)),
                                   _array_input(protocol, noise.name, ok_noise)], None, "shape"),
        "wrong text shape": (t2a, [_array_input(protocol, R.TEXT, np.array([[b"a dog", b"barks"]], dtype=object), "BYTES")], None, "shape"),
        "empty string": (t2a, [_text_input(protocol, [""])], None, "empty caption"),
        "blank string": (t2a, [_text_input(protocol, ["   "])], None, "empty caption"),
        "10 kB string": (t2a, [_text_input(protocol, ["a dog barks " * 853])], None, "exceeds the limit"),
        "batch above max": (t2a, [_text_input(protocol, ["a dog"] * (max_batch + 1))], None, "batch"),
        "NaN embedding": (smp.name, [_array_input(protocol, cond.name, nan_cond), _array_input(protocol, noise.name, ok_noise)], None, "nan"),
        "unknown model": ("no_such_model", [_text_input(protocol, TEXTS[:1])], None, "no_such_model"),
        "unknown output": (t2a, [_text_input(protocol, TEXTS[:1])], ["no_such_output"], "no_such_output"),
        "negative seed": (t2a, [_text_input(protocol, TEXTS[:1]), _seed_input(protocol, [-1])], None, "non-negative"),
    }


BAD = ["wrong dtype", "wrong seed dtype", "wrong shape", "wrong text shape", "empty string", "blank string",
       "10 kB string", "batch above max", "NaN embedding", "unknown model", "unknown output", "negative seed"]


@pytest.fixture(scope="module")
def reference_one(env):
    with TextToAudioBridge(env[0]) as bridge:
        return bridge(TEXTS[:1])


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", BAD)
def test_bad_request_is_an_error_and_the_server_keeps_answering(server, env, reference_one, protocol, case):
    client = _client(server, protocol)
    model, inputs, outputs, words = _bad_requests(env, protocol)[case]
    outs = [_mod(protocol).InferRequestedOutput(o) for o in outputs] if outputs else None
    with pytest.raises(InferenceServerException) as e:
        client.infer(model, inputs, outputs=outs)
    assert words.lower() in str(e.value).lower(), str(e.value)
    # a client mistake is a 4xx (400, or 404 for an unknown model), never a server fault
    want = {"unknown model": ("404", "StatusCode.NOT_FOUND")}.get(case, ("400", "StatusCode.INVALID_ARGUMENT"))
    assert str(e.value.status()) in want, (case, e.value.status(), str(e.value))
    assert "\n" not in str(e.value)
    # ... and a correct request right after still gets the right answer
    _assert_bridge(client.infer(R.embedding_ensemble("text", "audio"), [_text_input(protocol, TEXTS[:1])]), reference_one)
    assert client.is_server_live() and client.is_server_ready()


def test_bad_row_does_not_fail_requests_batched_with_it(server, env, reference_one):
    """A bad request and good ones in flight together: only the bad one errors."""
    errors, results = [], []

    def send(text):
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            r = client.infer(R.embedding_ensemble("text", "audio"), [_text_input("http", [text])])
            results.append(r.as_numpy(R.OUTPUTS["bridged"]))
        except InferenceServerException as e:
            errors.append(str(e))
        finally:
            client.close()

    threads = [threading.Thread(target=send, args=(t,)) for t in [TEXTS[0], "", TEXTS[0], TEXTS[0]]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1 and "empty caption" in errors[0]
    assert len(results) == 3
    for r in results:
        assert _maxabs(r, reference_one.bridged) <= TOL


# -- bounded concurrent load ------------------------------------------------------------------------
CLIENTS, REQUESTS = 8, 200


def _stats(server, model):
    s = server.http_client().get_inference_statistics(model)["model_stats"][0]
    return int(s["inference_count"]), int(s["execution_count"])


def test_concurrent_load_is_correct_and_dynamically_batched(server, env):
    export = env[0]
    texts = TEXTS + ["a cat purrs"]
    seeds = [0, 1, 2, 3]
    with TextToAudioBridge(export) as bridge:
        expected = {(t, s): bridge([t], seed=s).bridged[0] for t in texts for s in seeds}
    watched = [R.sampler_name("text", "audio"), R.encoder_name("text"), R.TOKENIZER]
    before = {m: _stats(server, m) for m in watched}
    failures: list[str] = []
    done = [0] * CLIENTS

    def worker(c: int) -> None:
        protocol = PROTOCOLS[c % 2]
        client = _client(server, protocol)
        rng = np.random.default_rng(c)
        for _ in range(REQUESTS):
            t, s = texts[rng.integers(len(texts))], seeds[rng.integers(len(seeds))]
            try:
                r = client.infer(R.embedding_ensemble("text", "audio"), [_text_input(protocol, [t]), _seed_input(protocol, [s])])
                got = r.as_numpy(R.OUTPUTS["bridged"])[0]
                if _maxabs(got, expected[(t, s)]) > TOL:
                    failures.append(f"client {c}: wrong answer for {(t, s)}")
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                failures.append(f"client {c}: {type(e).__name__}: {e}")
            done[c] += 1

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    assert sum(done) == CLIENTS * REQUESTS
    for m in watched:
        inf, exe = (a - b for a, b in zip(_stats(server, m), before[m]))
        assert inf == CLIENTS * REQUESTS, (m, inf)
        # Dynamic batching happened: fewer model executions than requests served.
        assert exe < inf, f"{m}: {exe} executions for {inf} inferences (no dynamic batching)"


# -- perf_analyzer (Triton's load generator, unpacked by benchmarks.perf_analyzer) --------------
@pytest.fixture(scope="module")
def perf_analyzer():
    from benchmarks.perf_analyzer import perf_analyzer as get

    try:
        return get()
    except RuntimeError as e:  # only when the wheel cannot be downloaded (offline) and was never unpacked
        pytest.skip(f"perf_analyzer unavailable: {e}")


def test_perf_analyzer_is_idempotent(perf_analyzer):
    from benchmarks.perf_analyzer import ensure_perf_analyzer, tools_dir

    binary, env = perf_analyzer
    assert ensure_perf_analyzer() == binary and binary.is_relative_to(tools_dir())
    assert str(tools_dir() / "lib") in env["LD_LIBRARY_PATH"].split(":")


def test_perf_analyzer_drives_the_search_ensemble(server, perf_analyzer, tmp_path):
    import json
    import subprocess

    binary, penv = perf_analyzer
    data = tmp_path / "input.json"
    data.write_text(json.dumps({"data": [{R.TEXT: ["a dog barks"], R.SEED: [3]}, {R.TEXT: ["rain on a roof"]}]}))
    proc = subprocess.run(
        [str(binary), "-m", R.SEARCH_ENSEMBLE, "-u", server.grpc_url, "-i", "grpc", "--concurrency-range", "2:2",
         # A fixed number of requests, no stability search: this checks behaviour, not speed, so it must not
         # depend on a quiet machine (stability-seeking measurement is `make bench`'s job).
         "--input-data", str(data), "--request-count", "40"],
        env=penv, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Concurrency: 2, throughput:" in proc.stdout
    assert "Request count: 40" in proc.stdout
    assert R.SEARCH in proc.stdout  # composing-model statistics of the ensemble are reported
