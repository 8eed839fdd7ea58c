"""`diffgap triton-repo`: the generated repository, without a server (see test_triton_server.py).

Every config.pbtxt is parsed with Triton's own ModelConfig protobuf (tritonclient ships it), and
every tensor in it is checked against the export manifest's IOSpec: the generator may not retype a
name, dtype or dim. Ensembles are type-checked step by step as Triton does at load time.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import triton_fixtures
from diffgap.cli import main as cli_main
from diffgap.core.fsutil import sha256_file
from diffgap.core.iospec import triton_dtype
from diffgap.core.manifest import Manifest
from diffgap.core.names import head_name
from diffgap.runtime.pipeline import build_index
from diffgap.triton_models import repository as R

text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return triton_fixtures.shared_export(tmp_path_factory)


@pytest.fixture(scope="module")
def index(export, tmp_path_factory):
    return triton_fixtures.shared_index(tmp_path_factory)


@pytest.fixture(scope="module")
def portable(export, index, tmp_path_factory):
    return R.build_repository(export, tmp_path_factory.mktemp("out") / "repo", index=index, top_k=4)


def load_configs(repo: Path) -> dict[str, "model_config_pb2.ModelConfig"]:
    out = {}
    for p in sorted(Path(repo).glob("*/config.pbtxt")):
        cfg = text_format.Parse(p.read_text(), model_config_pb2.ModelConfig())
        assert cfg.name == p.parent.name
        assert (p.parent / "1").is_dir(), f"{p.parent.name}: Triton needs a version directory"
        out[cfg.name] = cfg
    return out


DT = model_config_pb2.DataType


def _tensor(cfg, name):
    for t in (*cfg.input, *cfg.output):
        if t.name == name:
            return t
    raise AssertionError(f"{cfg.name} has no tensor {name!r}")


def _assert_matches_spec(t, spec, name=None):
    assert t.name == (name or spec.name)
    assert DT.Name(t.data_type) == triton_dtype(spec.dtype), (t.name, DT.Name(t.data_type), spec.dtype)
    assert list(t.dims) == list(spec.feature_shape), (t.name, list(t.dims), spec.shape)


# ------------------------------------------------------------------------------------------------
def test_layout_and_models(portable):
    cfgs = load_configs(portable)
    expected = {
        R.TOKENIZER, R.SEARCH, R.SEARCH_ENSEMBLE,
        *(R.encoder_name(m) for m in ("text", "audio")),
        *(f(s, t) for s, t in R.DIRECTIONS for f in (R.sampler_name, R.noise_name, R.embedding_ensemble)),
    }
    assert set(cfgs) == expected
    info = R.read_repository_info(portable)
    assert info["flavor"] == "portable" and sorted(info["models"]) == sorted(expected) and info["top_k"] == 4
    for name in (R.encoder_name("text"), R.sampler_name("text", "audio")):
        assert (portable / name / "1" / "model.onnx").is_file()
        assert (portable / name / "1" / "model.py").read_text() == (Path(R.__file__).parent / "python_model.py").read_text()


def served(man: Manifest) -> dict:
    """The export's models a repository serves: all but the heads alone, which only a search whose
    query-side bridge weighs 0 runs (tests/test_search_triton_lean.py)."""
    return {k: v for k, v in man.models.items() if k not in {head_name(m) for m in ("text", "audio")}}


def test_exported_models_follow_the_manifest(portable, export):
    man = Manifest.load(export)
    cfgs = load_configs(portable)
    assert set(served(man)) <= set(cfgs)
    for name, entry in served(man).items():
        cfg, io = cfgs[name], entry.io
        assert cfg.backend == "python" and cfg.max_batch_size == io.max_batch
        assert [t.name for t in cfg.input] == io.input_names
        assert [t.name for t in cfg.output] == io.output_names
        for t, spec in zip(cfg.input, io.inputs):
            _assert_matches_spec(t, spec)
            assert t.optional == spec.optional
        for t, spec in zip(cfg.output, io.outputs):
            _assert_matches_spec(t, spec)
        assert cfg.HasField("dynamic_batching")
        assert cfg.dynamic_batching.max_queue_delay_microseconds == R.PORTABLE_QUEUE_DELAY_US
        assert cfg.parameters["intra_op_threads"].string_value == "0"  # onnxruntime's default: one per core
        assert set(cfg.dynamic_batching.preferred_batch_size) <= set(range(1, io.max_batch + 1))
        assert sha256_file(portable / name / "1" / "model.onnx") == man.files[entry.files["fp32"]]["sha256"]
        assert json.loads((portable / name / "1" / "io.json").read_text()) == io.to_dict()


def test_tokenizer_outputs_are_the_text_encoder_inputs(portable, export):
    enc = Manifest.load(export).model(R.encoder_name("text")).io
    cfg = load_configs(portable)[R.TOKENIZER]
    assert [(t.name, DT.Name(t.data_type), list(t.dims)) for t in cfg.input] == [(R.TEXT, "TYPE_STRING", [1])]
    for t, spec in zip(cfg.output, enc.inputs, strict=True):
        _assert_matches_spec(t, spec)


def _check_ensemble(cfgs, ens):
    """Triton's load-time rules: every step tensor exists with one dtype/dims; max batch bounded."""
    tensors = {t.name: (t.data_type, list(t.dims)) for t in ens.input}
    composing = []
    for step in ens.ensemble_scheduling.step:
        m = cfgs[step.model_name]
        composing.append(m)
        required = {t.name for t in m.input if not t.optional}
        assert required <= set(step.input_map), (step.model_name, required - set(step.input_map))
        for key, value in step.input_map.items():
            t = _tensor(m, key)
            assert value in tensors, f"{ens.name}: {value} used by {step.model_name} before it is produced"
            assert tensors[value] == (t.data_type, list(t.dims)), (ens.name, step.model_name, key)
        for key, value in step.output_map.items():
            t = _tensor(m, key)
            assert value not in tensors or tensors[value] == (t.data_type, list(t.dims))
            tensors[value] = (t.data_type, list(t.dims))
    for t in ens.output:
        assert tensors[t.name] == (t.data_type, list(t.dims)), (ens.name, t.name)
    assert 0 < ens.max_batch_size <= min(m.max_batch_size for m in composing)


def test_ensembles_type_check(portable):
    cfgs = load_configs(portable)
    ensembles = [c for c in cfgs.values() if c.platform == "ensemble"]
    assert {e.name for e in ensembles} == {R.SEARCH_ENSEMBLE, *(R.embedding_ensemble(s, t) for s, t in R.DIRECTIONS)}
    for ens in ensembles:
        _check_ensemble(cfgs, ens)
        seed = _tensor(ens, R.SEED)
        assert seed.optional and DT.Name(seed.data_type) == "TYPE_INT64", "clients may omit the seed"


def test_no_tensor_name_is_retyped(export, tmp_path):
    """Rename tensors and shrink a batch profile in the manifest only: the configs follow."""
    man = Manifest.load(export)
    d = man.to_dict()
    enc = d["models"][R.encoder_name("text")]["io"]
    enc["outputs"][0]["name"] = "text_features"
    enc["inputs"][0]["name"] = "token_ids"
    enc["meta"]["roles"]["token_ids"] = "token_ids"  # the declaration's role map follows the rename
    d["models"][R.sampler_name("text", "audio")]["io"]["max_batch"] = 6
    d["models"][R.sampler_name("text", "audio")]["io"]["opt_batch"] = 3
    export_copy = _copy_export(export, tmp_path / "export")
    (export_copy / "manifest.json").write_text(json.dumps(d))
    cfgs = {n: md.config for n, md in R.plan_repository(Manifest.load(export_copy, verify=True)).items()}
    assert [t["name"] for t in cfgs[R.encoder_name("text")]["output"]] == ["text_features"]
    assert [t["name"] for t in cfgs[R.TOKENIZER]["output"]] == ["token_ids"]
    steps = cfgs[R.embedding_ensemble("text", "audio")]["ensemble_scheduling"]["step"]
    assert steps[1]["output_map"] == [{"key": "text_features", "value": R.OUTPUTS["clap"]}]
    assert steps[1]["input_map"][0]["key"] == "token_ids"
    assert cfgs[R.sampler_name("text", "audio")]["max_batch_size"] == 6
    assert cfgs[R.embedding_ensemble("text", "audio")]["max_batch_size"] == 6
    assert cfgs[R.sampler_name("text", "audio")]["dynamic_batching"]["preferred_batch_size"] == [3, 6]


def test_search_model_ships_the_index(portable, index):
    d = portable / R.SEARCH / "1"
    assert (d / "index" / "manifest.json").read_bytes() == (index / "manifest.json").read_bytes()  # the index directory ships
    spec = json.loads((d / "search.json").read_text())
    assert spec["k"] == 4 and set(spec["weights"]) == {"raw", "head", "query_bridge", "gallery_bridge"}
    cfg = load_configs(portable)[R.SEARCH_ENSEMBLE]
    assert [(t.name, DT.Name(t.data_type), list(t.dims)) for t in cfg.output] == [
        (R.SEARCH_IDS, "TYPE_STRING", [4]), (R.SEARCH_SCORES, "TYPE_FP32", [4])]


def test_queue_delay_option(export, tmp_path):
    repo = R.build_repository(export, tmp_path / "repo", queue_delay_us=250)
    cfgs = load_configs(repo)
    delays = {c.dynamic_batching.max_queue_delay_microseconds for c in cfgs.values() if c.platform != "ensemble"}
    assert delays == {250}
    with pytest.raises(ValueError, match="queue delay"):
        R.build_repository(export, tmp_path / "bad", queue_delay_us=-1)


def test_intra_op_threads_option(export, tmp_path):
    repo = R.build_repository(export, tmp_path / "repo", intra_op_threads=2)
    onnx_models = [c for c in load_configs(repo).values() if c.parameters["diffgap_role"].string_value == "onnx"]
    assert onnx_models and {c.parameters["intra_op_threads"].string_value for c in onnx_models} == {"2"}
    with pytest.raises(ValueError, match="--intra-op-threads must be >= 0"):
        R.build_repository(export, tmp_path / "bad", intra_op_threads=-1)


def test_without_index_there_is_no_search(export, tmp_path):
    repo = R.build_repository(export, tmp_path / "repo")
    names = set(load_configs(repo))
    assert R.SEARCH not in names and R.SEARCH_ENSEMBLE not in names
    assert R.embedding_ensemble("text", "audio") in names


def test_gpu_flavour_onnxruntime_alternative(export, index, tmp_path):
    man = Manifest.load(export)
    repo = R.build_repository(export, tmp_path / "gpu", flavor="gpu", gpu_platform="onnxruntime_onnx", index=index)
    cfgs = load_configs(repo)
    for name, entry in served(man).items():
        cfg = cfgs[name]
        assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == entry.io.max_batch
        assert [model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in cfg.instance_group] == ["KIND_GPU"]
        assert list(cfg.dynamic_batching.preferred_batch_size) == sorted({entry.io.opt_batch, entry.io.max_batch})
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator
        assert len(acc) == 1 and acc[0].name == "tensorrt"
        p = dict(acc[0].parameters)
        # FP16/INT8 off ("FP32" in the onnxruntime backend's words): the FP16 graph keeps its own types
        assert p["precision_mode"] == "FP32"
        # one explicit profile: the IOSpec's min/opt/max shapes of every input, "name:d0xd1,..."
        for kind, col in (("min", 0), ("opt", 1), ("max", 2)):
            shapes = dict(item.split(":") for item in p[f"trt_profile_{kind}_shapes"].split(","))
            assert shapes == {t.name: "x".join(map(str, entry.io.profile(t.name)[col])) for t in entry.io.inputs}
        # one flat folder per model directly under /tmp: onnxruntime creates only the last level
        assert p["trt_engine_cache_enable"] == "1" and p["trt_engine_cache_path"] == f"/tmp/diffgap_ort_trt_{name}"
        assert sha256_file(repo / name / "1" / "model.onnx") == man.files[entry.files["fp16"]]["sha256"]
        for t, spec in zip(cfg.input, entry.io.inputs):
            _assert_matches_spec(t, spec)
    # the python helpers stay on CPU; the ensembles are identical to the portable flavour's
    assert cfgs[R.TOKENIZER].backend == "python"
    for ens in (c for c in cfgs.values() if c.platform == "ensemble"):
        _check_ensemble(cfgs, ens)


def test_gpu_flavour_accelerator_agrees_with_the_ort_trt_backend(export, tmp_path):
    """Triton's onnxruntime_onnx accelerator and open_model's ort-trt backend set the same options, and
    each model caches in one flat folder directly under the given (existing) folder: onnxruntime
    creates only that last level."""
    from diffgap.runtime.ort_trt import ort_trt_options

    repo = R.build_repository(export, tmp_path / "gpu", flavor="gpu", gpu_platform="onnxruntime_onnx",
                              ort_trt_cache_dir="/models_cache")
    cfgs = load_configs(repo)
    for name, entry in served(Manifest.load(export)).items():
        p = dict(cfgs[name].optimization.execution_accelerators.gpu_execution_accelerator[0].parameters)
        folder = f"/models_cache/diffgap_ort_trt_{name}"
        assert p["trt_engine_cache_path"] == p["trt_timing_cache_path"] == folder
        want = ort_trt_options(entry.io, folder)
        # the backend's precision_mode maps to trt_fp16_enable / trt_int8_enable (FP16 -> fp16, INT8 -> int8)
        assert want.pop("trt_fp16_enable") is (p.pop("precision_mode") == "FP16") is False
        assert want.pop("trt_int8_enable") is False
        # nothing beyond the shared options (a workspace cap here and not in ort-trt would differ)
        assert p == {k: ("1" if v else "0") if isinstance(v, bool) else str(v) for k, v in want.items()}
    default = R.build_repository(export, tmp_path / "gpu2", flavor="gpu", gpu_platform="onnxruntime_onnx")
    p = load_configs(default)[sorted(served(Manifest.load(export)))[0]]
    folder = dict(p.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters)["trt_engine_cache_path"]
    assert Path(folder).parent == Path("/tmp") and Path(folder).name.startswith("diffgap_ort_trt_")


def test_serve_refuses_a_gpu_flavour_repository(export, tmp_path, capsys):
    """The tritonserver bundled with nvidia-pytriton has the python backend only: `diffgap serve` says so
    in one line, before starting anything, and points to NVIDIA's Triton image."""
    repo = R.build_repository(export, tmp_path / "gpu", flavor="gpu", gpu_platform="onnxruntime_onnx")
    assert cli_main(["serve", str(repo)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gpu-flavour repository" in err and "nvcr.io/nvidia/tritonserver" in err
    assert "onnxruntime_onnx" in err
    portable = R.build_repository(export, tmp_path / "portable")
    R.check_servable_by_bundled_server(portable)  # a portable repository passes


def test_gpu_flavour_tensorrt_needs_the_server_trt_version(export, tmp_path):
    from diffgap.core.errors import UserError

    with pytest.raises(UserError, match="--server-trt-version .*dpkg -l \\| grep nvinfer.*onnxruntime_onnx"):
        R.build_repository(export, tmp_path / "gpu", flavor="gpu")
    with pytest.raises(UserError, match="not a version"):
        R.build_repository(export, tmp_path / "gpu", flavor="gpu", server_trt_version="latest")
    assert cli_main(["triton-repo", str(export), "--out", str(tmp_path / "gpu"), "--flavor", "gpu"]) == 2
    assert not (tmp_path / "gpu").exists(), "a failed generation leaves nothing behind"


def test_gpu_flavour_tensorrt_needs_engines(export, tmp_path):
    with pytest.raises(FileNotFoundError, match="build-engines"):
        R.build_repository(export, tmp_path / "gpu", flavor="gpu", server_trt_version="10.8.0")
    assert not (tmp_path / "gpu").exists(), "a failed generation leaves nothing behind"


@pytest.mark.gpu
def test_gpu_flavour_tensorrt_plans(export, tmp_path):
    from diffgap.runtime.engine import build_engines, find_engine

    from diffgap.core.errors import UserError
    from diffgap.runtime.engine import HostInfo

    build_engines(export, engine_dir=tmp_path / "engines")
    here = HostInfo.current().trt_version
    major, minor = here.split(".")[:2]
    other = f"{major}.{int(minor) + 1}.0"
    with pytest.raises(UserError, match=f"built with TensorRT {here} but the server runs TensorRT {other}"):
        R.build_repository(export, tmp_path / "bad", flavor="gpu", engine_dir=tmp_path / "engines", server_trt_version=other)
    assert not (tmp_path / "bad").exists()
    repo = R.build_repository(export, tmp_path / "gpu", flavor="gpu", engine_dir=tmp_path / "engines",
                              server_trt_version=here)
    assert R.read_repository_info(repo)["server_trt_version"] == here
    cfgs = load_configs(repo)
    man = Manifest.load(export)
    for name, entry in served(man).items():
        cfg = cfgs[name]
        assert cfg.platform == "tensorrt_plan"
        plan = find_engine(man, name, "fp16", engine_dir=tmp_path / "engines")
        assert sha256_file(repo / name / "1" / "model.plan") == sha256_file(plan)
        assert cfg.max_batch_size == entry.io.max_batch
        assert [model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in cfg.instance_group] == ["KIND_GPU"]
        assert not any(t.optional for t in cfg.input), "a plan binds every input"
        assert cfg.optimization.cuda.graphs
        assert [g.batch_size for g in cfg.optimization.cuda.graph_spec] == list(cfg.dynamic_batching.preferred_batch_size)


def _copy_export(export: Path, dest: Path) -> Path:
    shutil.copytree(export, dest)
    return dest


def test_bad_inputs_leave_nothing_behind(export, index, tmp_path):
    with pytest.raises(ValueError, match="flavour"):
        R.build_repository(export, tmp_path / "a", flavor="cpu")
    with pytest.raises(ValueError, match="top-k"):
        R.build_repository(export, tmp_path / "a", top_k=0)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        R.build_repository(tmp_path, tmp_path / "a")
    # an index of another model (different checkpoint) is refused
    other = _copy_export(export, tmp_path / "other_export")
    d = json.loads((other / "manifest.json").read_text())
    d["checkpoint_sha256"] = "1" * 64
    (other / "manifest.json").write_text(json.dumps(d))
    foreign = build_index(other, tmp_path / "foreign.npz", audio=np.eye(3, Manifest.load(other).embed_dim, dtype=np.float32), ids=["a", "b", "c"])
    with pytest.raises(ValueError, match="another model"):
        R.build_repository(export, tmp_path / "a", index=foreign)
    with pytest.raises(FileNotFoundError):
        R.build_repository(export, tmp_path / "a", index=tmp_path / "missing.npz")
    assert not (tmp_path / "a").exists()
    assert not list(tmp_path.glob(".a.*")), "no temporary directory left behind"


def test_corrupt_export_file_is_refused(export, tmp_path):
    copy = _copy_export(export, tmp_path / "export")
    onnx_file = copy / f"{R.sampler_name('text', 'audio')}.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:100])
    with pytest.raises(ValueError, match="sha256"):
        R.build_repository(copy, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_cli_triton_repo(export, index, tmp_path, capsys):
    out = tmp_path / "repo"
    assert cli_main(["triton-repo", str(export), "--out", str(out), "--index", str(index), "--top-k", "3"]) == 0
    printed = capsys.readouterr().out
    assert R.SEARCH_ENSEMBLE in printed and f"diffgap serve {out}" in printed
    assert R.read_repository_info(out)["top_k"] == 3
    assert cli_main(["triton-repo", str(export), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["triton-repo", str(export), "--out", str(out), "--overwrite"]) == 0
    assert R.SEARCH not in R.read_repository_info(out)["models"]
    assert cli_main(["triton-repo", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err


def test_config_text_is_triton_protobuf_text():
    text = R.config_text({"name": 'a "quoted" name', "parameters": R.parameters(x='back\\slash')})
    cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert cfg.name == 'a "quoted" name' and cfg.parameters["x"].string_value == "back\\slash"
    # map fields as lists of key/value entries (text format's own shape) or as dicts: one message
    step = {"model_name": "m", "input_map": [{"key": "a", "value": "b"}], "output_map": {"c": "d"}}
    listed = R.model_config({"name": "e", "platform": "ensemble", "ensemble_scheduling": {"step": [step]}})
    s = listed.ensemble_scheduling.step[0]
    assert dict(s.input_map) == {"a": "b"} and dict(s.output_map) == {"c": "d"}
    # a message passes through; its text is what Triton's parser reads back
    assert text_format.Parse(R.config_text(listed), model_config_pb2.ModelConfig()) == listed
    # mistakes fail at generation, not at server start-up
    with pytest.raises(ValueError, match="not a valid Triton ModelConfig"):
        R.config_text({"name": "x", "max_batch": 4})
    with pytest.raises(ValueError, match="not a valid Triton ModelConfig"):
        R.config_text({"name": "x", "input": [{"name": "i", "data_type": "TYPE_FLOAT32", "dims": [1]}]})
