"""Video<->audio Triton repositories: the CAVP models, noise models and
the ensembles ``video_to_audio_embedding`` / ``audio_to_video_embedding`` generated from the export's
IOSpecs in both flavours, and the portable one on the real tritonserver (HTTP and gRPC) against the
in-process runtime, with bad requests answered by errors and correct ones still served afterwards.

One tiny CAVP export per session (tests/cavp_fixtures.py), one server per module with ``import torch``
blocked in its python models."""
from __future__ import annotations

import numpy as np
import pytest

import cavp_fixtures
from diffgap.core.iospec import ROLE_BRIDGED, ROLE_CONDITION, ROLE_GUIDANCE, ROLE_NOISE, triton_dtype
from diffgap.core.manifest import Manifest
from diffgap.runtime import AudioToVideoBridge, VideoToAudioBridge
from diffgap.triton_models import repository as R
from diffgap.triton_models.server import TritonServer

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from tritonclient.utils import InferenceServerException, np_to_triton_dtype  # noqa: E402

import triton_fixtures  # noqa: E402

TOL = 1e-5  # max abs: the same ONNX graphs on onnxruntime CPU with the same noise, batched differently
PROTOCOLS = ("http", "grpc")
DIRS = R.FAMILIES["cavp"]
OUT = R.FAMILY_OUTPUTS["cavp"]
BRIDGES = {("video", "audio"): VideoToAudioBridge, ("audio", "video"): AudioToVideoBridge}
EXPECTED = {
    *(R.encoder_name(m, "cavp") for m in ("video", "audio")),
    *(f(s, t) for s, t in DIRS for f in (R.sampler_name, R.noise_name, R.embedding_ensemble)),
}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return cavp_fixtures.shared_export(tmp_path_factory)[1].out


@pytest.fixture(scope="module")
def repo(export, tmp_path_factory):
    return R.build_repository(export, tmp_path_factory.mktemp("cavp_triton") / "repo", flavor="portable")


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    srv = TritonServer(repo, cwd=triton_fixtures.torch_blocker(tmp_path_factory.mktemp("notorch")))
    with srv:
        yield srv
    assert not srv.running()


def _configs(repo):
    out = {}
    for p in sorted(repo.glob("*/config.pbtxt")):
        out[p.parent.name] = text_format.Parse(p.read_text(), model_config_pb2.ModelConfig())
    return out


def _tensor(cfg, name):
    for t in (*cfg.input, *cfg.output):
        if t.name == name:
            return t
    raise AssertionError(f"{cfg.name} has no tensor {name!r}")


def _same(t, spec):
    dt = model_config_pb2.DataType.Name(t.data_type)
    return dt == triton_dtype(spec.dtype) and list(t.dims) == list(spec.feature_shape)


# -- generation -------------------------------------------------------------------------------------
def test_family_is_read_from_the_manifest(export, repo):
    man = Manifest.load(export)
    assert R.encoder_family(man) == "cavp"
    info = R.read_repository_info(repo)
    assert info["encoder_family"] == "cavp" and set(info["models"]) == EXPECTED
    with pytest.raises(ValueError, match="drop --index"):
        R.plan_repository(man, index=repo / "index.npz")
    man.models.pop(R.sampler_name("audio", "video"))
    with pytest.raises(ValueError, match="exactly one family"):
        R.plan_repository(man)


# ids: a bare "gpu" id would become the keyword tests/conftest.py skips GPU-only tests by.
@pytest.mark.parametrize("flavor", ["portable", "gpu"], ids=["portable", "gpu-flavour"])
def test_configs_come_from_the_iospecs(export, repo, tmp_path, flavor):
    man = Manifest.load(export)
    if flavor == "portable":
        cfgs = _configs(repo)
    else:
        cfgs = _configs(R.build_repository(export, tmp_path / "gpu", flavor="gpu", gpu_platform="onnxruntime_onnx"))
    assert set(cfgs) == EXPECTED
    for s, t in DIRS:
        enc = man.model(R.encoder_name(s, "cavp")).io
        smp = man.model(R.sampler_name(s, t)).io
        ecfg = cfgs[enc.name]
        if flavor == "gpu":
            assert ecfg.platform == "onnxruntime_onnx" and ecfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
            assert (tmp_path / "gpu" / enc.name / "1" / "model.onnx").read_bytes() == man.path(enc.name, "fp16").read_bytes()
        else:
            assert ecfg.backend == "python"
        assert ecfg.max_batch_size == enc.max_batch
        for spec in (*enc.inputs, *enc.outputs):
            assert _same(_tensor(ecfg, spec.name), spec), (enc.name, spec.name)
        ens = cfgs[R.embedding_ensemble(s, t)]
        assert ens.platform == "ensemble"
        assert _same(_tensor(ens, enc.inputs[0].name), enc.inputs[0])
        assert _same(_tensor(ens, OUT["clap"]), enc.outputs[0])
        assert _same(_tensor(ens, OUT["bridged"]), smp.role(ROLE_BRIDGED))
        assert [st.model_name for st in ens.ensemble_scheduling.step] == [enc.name, R.noise_name(s, t), smp.name]
        assert ens.max_batch_size == min(enc.max_batch, smp.max_batch)


# -- the real server ----------------------------------------------------------------------------------
def _mod(protocol):
    return httpclient if protocol == "http" else grpcclient


def _client(server, protocol):
    return server.http_client() if protocol == "http" else server.grpc_client()


def _inp(protocol, name, arr):
    x = _mod(protocol).InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
    x.set_data_from_numpy(arr)
    return x


def _seed(protocol, seeds):
    return _inp(protocol, R.SEED, np.asarray(seeds, np.int64).reshape(-1, 1))


def _source(bridge, batch, seed):
    spec = bridge.encoder.io.inputs[0]
    rng = np.random.default_rng(seed)
    if bridge.source == "video":
        return spec.name, rng.uniform(0.0, 1.0, spec.concrete(batch)).astype(spec.np_dtype)
    return spec.name, rng.uniform(-0.5, 0.5, spec.concrete(batch)).astype(spec.np_dtype)


def _maxabs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _assert_bridge(result, ref):
    for role, field in (("clap", "source"), ("projected", "projected"), ("bridged", "bridged")):
        got, want = result.as_numpy(OUT[role]), getattr(ref, field)
        assert got.shape == want.shape and got.dtype == np.float32, role
        assert _maxabs(got, want) <= TOL, f"{role}: max abs {_maxabs(got, want):.3g} > {TOL}"


def test_every_model_is_ready_with_torch_blocked(server, repo):
    index = {m["name"]: m.get("state") for m in server.http_client().get_model_repository_index()}
    assert set(index) == EXPECTED and all(s == "READY" for s in index.values()), index


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("direction", DIRS, ids=lambda d: "_to_".join(d))
def test_ensemble_matches_runtime(server, export, protocol, direction):
    client = _client(server, protocol)
    ensemble = R.embedding_ensemble(*direction)
    seeds = [0, 7, 123]
    with BRIDGES[direction](export) as bridge:
        name, x = _source(bridge, 3, seed=len(protocol))
        ref_seeded = bridge(x, seed=seeds)
        ref_default = bridge(x)
        ref_guided = bridge(x, seed=seeds, guidance_scale=1.5)
        g = bridge.sampler.io.role(ROLE_GUIDANCE)
    _assert_bridge(client.infer(ensemble, [_inp(protocol, name, x), _seed(protocol, seeds)]), ref_seeded)
    _assert_bridge(client.infer(ensemble, [_inp(protocol, name, x)]), ref_default)
    guide = _inp(protocol, g.name, np.full(g.concrete(3), 1.5, g.np_dtype))
    _assert_bridge(client.infer(ensemble, [_inp(protocol, name, x), _seed(protocol, seeds), guide]), ref_guided)


@pytest.fixture(scope="module")
def references(export):
    """direction -> (input name, one valid input row, its runtime BridgeResult at the default seed)."""
    out = {}
    for d, cls in BRIDGES.items():
        with cls(export) as bridge:
            name, x = _source(bridge, 1, seed=42)
            out[d] = (name, x, bridge(x))
    return out


def _bad_requests(export, protocol, direction, references):
    """case -> (model, inputs, expected words in the error)."""
    man = Manifest.load(export)
    name, x, _ = references[direction]
    enc = man.model(R.encoder_name(direction[0], "cavp")).io
    smp = man.model(R.sampler_name(*direction)).io
    ens = R.embedding_ensemble(*direction)
    max_batch = min(enc.max_batch, smp.max_batch)
    nan = x.copy()
    nan.reshape(-1)[3] = np.nan
    wrong_shape = np.zeros((1, *enc.inputs[0].feature_shape[:-1], enc.inputs[0].feature_shape[-1] + 1), np.float32)
    return {
        "wrong dtype": (ens, [_inp(protocol, name, x.astype(np.float64))], "data"),
        "wrong shape": (ens, [_inp(protocol, name, wrong_shape)], "shape"),
        "batch above max": (ens, [_inp(protocol, name, np.repeat(x, max_batch + 1, axis=0))], "batch"),
        "NaN input": (ens, [_inp(protocol, name, nan)], "nan"),
        "wrong seed dtype": (ens, [_inp(protocol, name, x), _inp(protocol, R.SEED, np.ones((1, 1), np.float32))], "data"),
        "negative seed": (ens, [_inp(protocol, name, x), _seed(protocol, [-1])], "non-negative"),
        "NaN condition": (smp.name, [_inp(protocol, smp.role(ROLE_CONDITION).name, np.full(smp.role(ROLE_CONDITION).concrete(1), np.nan, np.float32)),
                                     _inp(protocol, smp.role(ROLE_NOISE).name, np.zeros(smp.role(ROLE_NOISE).concrete(1), np.float32))], "nan"),
    }


BAD = ["wrong dtype", "wrong shape", "batch above max", "NaN input", "wrong seed dtype", "negative seed", "NaN condition"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("direction", DIRS, ids=lambda d: "_to_".join(d))
@pytest.mark.parametrize("case", BAD)
def test_bad_request_is_an_error_and_the_server_keeps_answering(server, export, references, protocol, direction, case):
    client = _client(server, protocol)
    model, inputs, words = _bad_requests(export, protocol, direction, references)[case]
    with pytest.raises(InferenceServerException) as e:
        client.infer(model, inputs)
    assert words.lower() in str(e.value).lower(), str(e.value)
    # a client mistake: HTTP 400 / gRPC INVALID_ARGUMENT, never a server fault
    assert str(e.value.status()) in ("400", "StatusCode.INVALID_ARGUMENT"), (e.value.status(), str(e.value))
    name, x, ref = references[direction]
    _assert_bridge(client.infer(R.embedding_ensemble(*direction), [_inp(protocol, name, x)]), ref)
    assert client.is_server_live() and client.is_server_ready()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_request_class_of_every_model_gets_its_documented_answer(server, references, protocol):
    """tests/serving_cases.py's classes on every CAVP model and ensemble: valid ones answered with finite
    batch-1 outputs, client mistakes answered 400 / INVALID_ARGUMENT (404 / NOT_FOUND for an unknown
    model) with their one-line message; the ensembles still answer correctly afterwards."""
    import serving_cases as SC

    client, mod = _client(server, protocol), (httpclient if protocol == "http" else grpcclient)
    configs = {m["name"]: server.http_client().get_model_config(m["name"]) for m in server.http_client().get_model_repository_index()}
    cases = [c for cfg in configs.values() for c in SC.cases(cfg, R.MAX_TEXT_BYTES)]
    assert 20 < len(cases) < 300, len(cases)
    failures = []
    for case in cases:
        outs = [mod.InferRequestedOutput(o) for o in case.outputs] or None
        try:
            result = client.infer(case.model, SC.client_inputs(mod, case.inputs), outputs=outs)
        except InferenceServerException as e:
            if case.kind == "valid" or not SC.is_documented_answer(case.kind, str(e.status()), str(e)) or "\n" in str(e):
                failures.append(f"{case.label}: {e.status()} {str(e)[:300]}")
            continue
        if case.kind != "valid":
            failures.append(f"{case.label}: answered 200")
            continue
        for out in configs[case.model]["output"]:
            got = result.as_numpy(out["name"])
            if got is None or got.shape[0] != 1 or (got.dtype.kind == "f" and not np.isfinite(got).all()):
                failures.append(f"{case.label}: output {out['name']} missing, not batch 1 or not finite")
    assert not failures, "\n".join(failures[:20])
    for direction in DIRS:
        name, x, ref = references[direction]
        _assert_bridge(client.infer(R.embedding_ensemble(*direction), [_inp(protocol, name, x)]), ref)
