"""Generation served by the real tritonserver: caption in, condition samples and waveforms out.

The portable repository of a clap-tiny-gen export (generator CLAP text tower + K-step raw-space
generation sampler) with a tiny random-weight AudioLDM folder (tests/generation_fixtures.py) as its
generator model. Expected values come from the in-process ``diffgap generate`` API
(:func:`diffgap.generation_pipeline.generate`) on the same checkpoint, generator, captions and seeds.

Tolerances:
- text embedding and condition samples, 1e-5 max abs: the served graphs are the torch modules
  exported to ONNX (FP32, onnxruntime CPU), which sum in another order than torch: float32 rounding
  over a few hundred ops is ~1e-6 (diffgap.export.check, whose own export bound is 1e-4); every
  vector is unit norm, so 1e-5 is a relative bound too.
- latent seeds: exactly equal (integer rule).
- waveform from the served conditions, 1e-6 max abs: the generator model runs the same function as
  ``diffgap generate`` on the same rows in one call.
- waveform against ``diffgap generate`` end to end, 1e-4 of the waveform's peak: the generator
  carries the float32-rounding-sized condition difference through its UNet, VAE and vocoder, a
  smooth map at these scales; the bound is checked to be at least 100x below the difference between
  two samples of one caption, so a wrong condition or seed cannot pass.

The server runs with this checkout's root as its working directory: the python-backend stubs put
their working directory first on ``sys.path``, so the served python models import this checkout's
``diffgap``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
httpclient = pytest.importorskip("tritonclient.http")
import torch  # noqa: E402

import generation_fixtures as gf  # noqa: E402
import diffgap  # noqa: E402
from diffgap.core.generation import GEN_GUIDANCE, latent_seed  # noqa: E402
from diffgap.core.iospec import ROLE_ATTENTION_MASK, ROLE_RAW_SAMPLE, ROLE_TOKEN_IDS  # noqa: E402
from diffgap.core.names import GENERATOR_TEXT_ENCODER, condition_ensemble_name, condition_sampler_name  # noqa: E402
from diffgap.triton_models import generation as G  # noqa: E402
from diffgap.triton_models import repository as R  # noqa: E402
from diffgap.triton_models.server import TritonServer  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

K = 3                      # bridge steps baked into the exported sampler
GEN_STEPS = 2              # generator denoising steps
AUDIO_S = 0.032            # 512 samples at the tiny vocoder's 16 kHz
CAPTIONS = ["a dog barks in the distance", "Ünïcödé café & jazz, 3 saxophones"]
SEEDS = [3, 11]
N = 2
TOL_EMB = 1e-5
TOL_SAME_FN = 1e-6
TOL_WAVE = 1e-4            # relative to the waveform's peak
CHECKOUT = Path(diffgap.__file__).resolve().parents[1]


def _model(seed: int = 0):
    return gf.perturbed_model(seed, "clap-tiny-gen")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """(generator folder, checkpoint, export dir, repository)."""
    from diffgap.checkpoint import save_checkpoint
    from diffgap.encoders.hf_clap import HFClapEncoder
    from diffgap.export.cli import export_all
    from diffgap.export.generator_text import add_generator_text_encoder
    from diffgap.generation import ENCODER_META

    root = tmp_path_factory.mktemp("triton_gen")
    gen = gf.tiny_audioldm(root / "audioldm")
    identity = HFClapEncoder.load(gen).identity()
    model = _model()
    ckpt = save_checkpoint(root / "ckpt", model, meta={ENCODER_META: identity})
    export = root / "export"
    export_all(ckpt, export, steps=K, encoders=None, fp16=False, generation_steps=K)
    add_generator_text_encoder(export, gen, fp16=False)
    repo = G.build_generation_repository(export, root / "repo", generator=gen, samples=N, num_inference_steps=GEN_STEPS,
                                         audio_length_in_s=AUDIO_S)
    return gen, ckpt, export, repo


@pytest.fixture(scope="module")
def server(env):
    with TritonServer(env[3], cwd=CHECKOUT) as srv:
        yield srv
    assert not srv.running()


def _inputs(captions, seeds=None, samples=None):
    text = np.array([[c.encode("utf-8")] for c in captions], dtype=object)
    x = [httpclient.InferInput(R.TEXT, list(text.shape), "BYTES")]
    x[0].set_data_from_numpy(text)
    for name, v in ((R.SEED, seeds), (G.SAMPLES, samples)):
        if v is not None:
            a = np.asarray(v, dtype=np.int64).reshape(-1, 1)
            x.append(httpclient.InferInput(name, list(a.shape), "INT64"))
            x[-1].set_data_from_numpy(a)
    return x


@pytest.fixture(scope="module")
def expected(env):
    """The in-process ``diffgap generate`` result for CAPTIONS / SEEDS / N."""
    from diffgap.generation_pipeline import GenerationSettings, generate

    gen, ckpt, _, _ = env
    s = GenerationSettings(n=N, seeds=SEEDS, steps=K, guidance_scale=GEN_GUIDANCE, num_inference_steps=GEN_STEPS,
                           audio_length_in_s=AUDIO_S)
    return generate(CAPTIONS, gen, ckpt, s, progress=False)


def _maxabs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_repository_layout(env):
    repo = env[3]
    names = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    assert names == sorted([G.GENERATOR_TOKENIZER, GENERATOR_TEXT_ENCODER, G.condition_noise_name(),
                            condition_sampler_name("text", "audio"), G.GENERATOR, condition_ensemble_name("text", "audio"),
                            G.waveform_ensemble_name()])
    # the generator model is the torch template, read as text; the folder is a parameter, not a copy
    assert "import torch" in (repo / G.GENERATOR / "1" / "model.py").read_text()
    assert str(Path(env[0]).resolve()) in (repo / G.GENERATOR / "config.pbtxt").read_text()


def test_waveform_equals_diffgap_generate(server, env, expected):
    r = server.http_client().infer(G.waveform_ensemble_name(), _inputs(CAPTIONS, SEEDS, [N] * len(CAPTIONS)))
    B = len(CAPTIONS)
    text = r.as_numpy(G.TEXT_EMBEDDING)
    cond = r.as_numpy(G.CONDITION)
    lseeds = r.as_numpy(G.LATENT_SEED)
    wave = r.as_numpy(G.WAVEFORM)
    assert text.shape == (B, 512) and cond.shape == (B * N, 512) and lseeds.shape == (B * N, 1)
    assert wave.shape == (B * N, expected.waveforms.shape[-1])
    # 1. the caption is embedded as the generator embeds it
    assert _maxabs(text, expected.text_embeddings) < TOL_EMB
    # 2. the condition samples are diffgap generate's (row b*N + j = sample j of caption b)
    d_cond = _maxabs(cond, expected.conditions.reshape(B * N, -1))
    assert d_cond < TOL_EMB
    # 3. the latent seeds follow the same rule
    assert lseeds.ravel().tolist() == [latent_seed(s, j) for s in SEEDS for j in range(N)]
    assert lseeds.ravel().tolist() == [x for row in expected.record["latent_seeds"] for x in row]
    # 4. the generator model is diffgap generate's generator call: the same waveform from the same rows
    from diffgap.encoders.hf_clap import HFClapEncoder
    from diffgap.generation_pipeline import load_generator, run_generator

    pipe = load_generator(env[0])
    g = expected.record["generator_guidance"]
    neg = HFClapEncoder.from_pipeline(pipe).encode_text_tensor([""]).numpy() if g > 1.0 else None
    same = run_generator(pipe, cond, lseeds.ravel().tolist(), neg, GEN_STEPS, AUDIO_S, g, progress=False)
    assert _maxabs(wave, same) < TOL_SAME_FN
    # 5. end to end: the served waveform is diffgap generate's, up to the generator's response to d_cond
    #    (relative to the waveform's peak: the random-weight vocoder's output is tiny in absolute terms)
    ref = expected.waveforms.reshape(B * N, -1)
    peak = float(np.abs(ref).max())
    d_wave = _maxabs(wave, ref) / peak
    assert d_wave < TOL_WAVE, f"waveform differs by {d_wave:.2e} of its peak (conditions by {d_cond:.2e})"
    # ... and that tolerance is far below what another condition or seed changes
    assert _maxabs(wave[0], wave[1]) / peak > 100 * TOL_WAVE


def test_condition_ensemble_defaults(server, expected):
    """No seed / samples: the repository's defaults (seed 0 + caption index, N samples), the rule of
    ``diffgap generate`` without --seed."""
    from diffgap.generation import sample_conditions

    B = len(CAPTIONS)
    r = server.http_client().infer(condition_ensemble_name("text", "audio"), _inputs(CAPTIONS))
    cond = r.as_numpy(G.CONDITION)
    assert cond.shape == (B * N, 512)
    np.testing.assert_allclose(np.linalg.norm(cond, axis=1), 1.0, atol=1e-5)
    ref = sample_conditions(_model(), expected.text_embeddings, n=N, seeds=R.DEFAULT_SEED,
                            steps=K, guidance_scale=GEN_GUIDANCE)
    assert _maxabs(cond, ref.reshape(B * N, -1)) < TOL_EMB
    assert r.as_numpy(G.LATENT_SEED).ravel().tolist() == [latent_seed(R.DEFAULT_SEED + b, j) for b in range(B) for j in range(N)]
    # samples are distinct draws, and the first n rows do not depend on how many were asked for
    assert _maxabs(cond[0], cond[1]) > 1e-3
    one = server.http_client().infer(condition_ensemble_name("text", "audio"), _inputs(CAPTIONS[:1], samples=[1]))
    assert _maxabs(one.as_numpy(G.CONDITION), cond[:1]) < TOL_EMB


@pytest.mark.parametrize("case", ["too_many_samples", "mixed_samples", "too_many_rows", "negative_seed"])
def test_client_mistakes_are_400(server, case):
    c = server.http_client()
    inputs = {
        "too_many_samples": _inputs(CAPTIONS[:1], samples=[G.MAX_SAMPLES + 1]),
        "mixed_samples": _inputs(CAPTIONS, samples=[1, 2]),
        "too_many_rows": _inputs(CAPTIONS * 5, samples=[2] * 10),
        "negative_seed": _inputs(CAPTIONS[:1], seeds=[-1]),
    }[case]
    with pytest.raises(InferenceServerException) as e:
        c.infer(condition_ensemble_name("text", "audio"), inputs)
    assert "400" in str(e.value.status()) or "Bad Request" in str(e.value), str(e.value)


def test_gpu_flavour_plan(env):
    """The gpu flavour: the exported graphs as onnxruntime_onnx models, the python steps on CPU,
    the generator on the GPU; the same ensembles."""
    models = G.plan_generation_repository(env[2], flavor="gpu", gpu_platform="onnxruntime_onnx", precision="fp32",
                                          generator=env[0])
    for name in (GENERATOR_TEXT_ENCODER, condition_sampler_name("text", "audio")):
        assert models[name].config["platform"] == "onnxruntime_onnx"
        assert models[name].config["instance_group"][0]["kind"] == "KIND_GPU"
    for name in (G.GENERATOR_TOKENIZER, G.condition_noise_name()):
        assert models[name].config["backend"] == "python"
        assert models[name].config["instance_group"][0]["kind"] == "KIND_CPU"
    gen = models[G.GENERATOR].config
    assert gen["instance_group"][0]["kind"] == "KIND_GPU" and gen["parameters"]["device"]["string_value"] == "cuda"
    portable = G.plan_generation_repository(env[2], generator=env[0])
    for ens in (condition_ensemble_name("text", "audio"), G.waveform_ensemble_name()):
        assert models[ens].config["ensemble_scheduling"] == portable[ens].config["ensemble_scheduling"]


def test_no_tensor_name_is_retyped(env):
    """Every composing model's tensors are the exported modules' declared names (read from the manifest)."""
    from diffgap.core.manifest import Manifest

    man = Manifest.load(env[2])
    models = G.plan_generation_repository(env[2], generator=env[0])
    for name in (GENERATOR_TEXT_ENCODER, condition_sampler_name("text", "audio")):
        io = man.model(name).io
        assert [t["name"] for t in models[name].config["input"]] == io.input_names
        assert [t["name"] for t in models[name].config["output"]] == io.output_names
    raw = man.model(condition_sampler_name("text", "audio")).io.role(ROLE_RAW_SAMPLE)
    steps = models[G.waveform_ensemble_name()].config["ensemble_scheduling"]["step"]
    sampler_step = next(s for s in steps if s["model_name"] == condition_sampler_name("text", "audio"))
    assert sampler_step["output_map"] == [{"key": raw.name, "value": G.CONDITION}]


def test_cli_triton_repo_generation(env, tmp_path, capsys):
    from diffgap.cli import main as cli_main

    out = tmp_path / "repo"
    assert cli_main(["triton-repo", str(env[2]), "--out", str(out), "--generation", "--samples", "3"]) == 0
    assert condition_ensemble_name("text", "audio") in capsys.readouterr().out
    assert not (out / G.GENERATOR).exists(), "no generator without --generator"
    noise_cfg = (out / G.condition_noise_name() / "config.pbtxt").read_text()
    assert 'key: "default_samples"' in noise_cfg and 'string_value: "3"' in noise_cfg
    # a generator without --generation, and --generation on an export without the generator's text tower, are refused
    assert cli_main(["triton-repo", str(env[2]), "--out", str(tmp_path / "x"), "--generator", str(env[0])]) == 2
    assert not (tmp_path / "x").exists()


def test_export_cli_generator_needs_generation(env, tmp_path):
    from diffgap.cli import main as cli_main

    assert cli_main(["export", str(env[1]), "--out", str(tmp_path / "e"), "--generator", str(env[0])]) == 2
    assert not (tmp_path / "e").exists()


def test_hf_tokenizer_matches_transformers(env):
    """The torch-free tokenizer of the generation repository gives transformers' ids and masks (the
    pipelines' call: pad to model_max_length, truncate), unicode, overlong and empty captions included."""
    from transformers import AutoTokenizer

    from diffgap.core.tokenizer import load_tokenizer

    folder = Path(env[0]) / "tokenizer"
    ref = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    ours = load_tokenizer("hf", folder / "tokenizer.json")
    texts = ["A dog barks!", "Ünïcödé café & jazz, 3 saxophones", "word " * 200, "", "  spaces\tand\nnewlines  "]
    want = ref(texts, padding="max_length", max_length=ref.model_max_length, truncation=True)
    got = ours.encode_roles(texts)
    assert got[ROLE_TOKEN_IDS].tolist() == want["input_ids"]
    assert got[ROLE_ATTENTION_MASK].tolist() == want["attention_mask"]


def test_proxy_limits_bound_every_generation_input(env):
    """`diffgap serve` puts a body-size limit in front of tritonserver from every config.pbtxt: the
    generation repository's inputs (caption, seeds, samples, condition rows) must all be bounded."""
    from diffgap.triton_models.limits import request_limits

    lim = request_limits(env[3])
    assert 0 < lim.http_bytes < 64 * 2**20 and 0 < lim.grpc_bytes < 64 * 2**20
