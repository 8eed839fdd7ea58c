"""Generation: the raw-space bridge, the transformers CLAP source and ``diffgap generate`` with tiny
random-weight AudioLDM / MusicLDM pipelines built from configs (tests/generation_fixtures.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import generation_fixtures as gf
from diffgap import cli
from diffgap.checkpoint import save_checkpoint
from diffgap.config import get_preset
from diffgap.core.errors import UserError
from diffgap.core.generation import generation_noise, latent_seed
from diffgap.generation import HeadInverse, RawSpaceBridge, check_encoder, sample_conditions
from diffgap.models import DiffGAP

AUDIO_S = 0.032                  # 512 samples at the tiny vocoder's 16 kHz
FAST = dict(steps=3, num_inference_steps=2, audio_length_in_s=AUDIO_S)


def _model(seed: int = 0, preset: str = "clap-tiny-gen") -> DiffGAP:
    return gf.perturbed_model(seed, preset)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return {"audioldm": gf.tiny_audioldm(root / "audioldm"), "musicldm": gf.tiny_musicldm(root / "musicldm"), "root": root}


@pytest.fixture(scope="module")
def pipes(folders):
    from diffgap.generation_pipeline import load_generator

    return {k: load_generator(folders[k]) for k in ("audioldm", "musicldm")}


# ---- the raw-space bridge ------------------------------------------------------------------------
def test_head_inverse_is_exact_on_unit_vectors():
    m = _model()
    inv = HeadInverse(m, "audio")
    x = F.normalize(torch.randn(256, 512), dim=-1)
    with torch.no_grad():
        back = inv(m.project("audio", x))
    assert torch.allclose(back, x, atol=2e-5)


def test_raw_samples_are_the_head_space_samples_mapped_back():
    """The raw sample's head image is the K-step head-space bridge sample from the same noise."""
    m = _model()
    cond = F.normalize(torch.randn(6, 512), dim=-1)
    noise = torch.randn(6, 512)
    g = torch.full((6, 1), 2.0)
    with torch.no_grad():
        raw = RawSpaceBridge(m, steps=5)(cond, noise, g)
        h = m.bridge("audio_given_text", cond, noise, steps=5, guidance_scale=g, mode="noise", eta=0.0)
        assert torch.allclose(raw.norm(dim=-1), torch.ones(6), atol=1e-5)
        assert torch.allclose(m.project("audio", raw), h, atol=2e-5)


def test_sample_conditions_seeded_and_per_caption():
    m = _model()
    cond = F.normalize(torch.randn(3, 512), dim=-1).numpy()
    a = sample_conditions(m, cond, n=4, seeds=[5, 6, 7], steps=4)
    assert a.shape == (3, 4, 512)
    np.testing.assert_allclose(np.linalg.norm(a, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a, sample_conditions(m, cond, n=4, seeds=[5, 6, 7], steps=4))
    # a caption's samples depend on its own seed and row only: not on the batch or on n
    one = sample_conditions(m, cond[1:2], n=2, seeds=6, steps=4)
    np.testing.assert_allclose(one[0], a[1, :2], atol=1e-6)
    assert np.abs(a[0, 0] - a[0, 1]).max() > 1e-3          # N samples differ


def test_noise_matches_the_runtime_draw():
    from diffgap.runtime.pipeline import make_noise

    z = generation_noise([3, 9], 2, 5, 16)
    np.testing.assert_array_equal(z[:, 0], make_noise([3, 9], 2, 16))
    np.testing.assert_array_equal(generation_noise(3, 1, 2, 16)[0], z[0, :2])
    assert latent_seed(3, 0) != latent_seed(3, 1) != latent_seed(4, 0)


def test_non_invertible_heads_are_refused():
    with pytest.raises(UserError, match="MLP heads"):
        RawSpaceBridge(DiffGAP(get_preset("clap-tiny")))
    with pytest.raises(UserError, match="square heads"):
        RawSpaceBridge(DiffGAP(get_preset("clap-tiny").replace(**{"heads.hidden": 0})))


# ---- transformers CLAP as an embedding source ----------------------------------------------------
def test_hf_clap_text_matches_the_pipelines_prompt_encoding(pipes):
    from diffgap.encoders.hf_clap import HFClapEncoder

    caps = ["a dog barks", "rain on a tin roof"]
    aldm = pipes["audioldm"]
    ref = aldm._encode_prompt(caps, torch.device("cpu"), 1, False)          # AudioLDM's own prompt path
    np.testing.assert_allclose(HFClapEncoder.from_pipeline(aldm).encode_text(caps), ref.detach().numpy(), atol=1e-5)
    mldm = pipes["musicldm"]
    tok = mldm.tokenizer(caps, padding="max_length", max_length=mldm.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    ref = mldm.text_encoder.get_text_features(tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
    np.testing.assert_allclose(HFClapEncoder.from_pipeline(mldm).encode_text(caps), ref.detach().numpy(), atol=1e-5)


def test_fingerprint_names_the_text_tower(folders):
    from transformers import ClapModel

    from diffgap.encoders.hf_clap import HFClapEncoder, fingerprint

    aldm = HFClapEncoder.load(folders["audioldm"])
    clap = gf.clap_model(seed=1)
    assert fingerprint(clap) != aldm.fingerprint()
    # a full ClapModel carrying the AudioLDM text tower's weights is the same CLAP text side
    clap.load_state_dict(aldm.tower.state_dict(), strict=False)
    assert fingerprint(clap) == aldm.fingerprint()
    assert isinstance(HFClapEncoder.load(folders["musicldm"]).tower, ClapModel)


def test_embed_hf_clap_records_the_fingerprint_and_train_keeps_it(folders, tmp_path):
    from diffgap.checkpoint import load_checkpoint
    from diffgap.core.data import load_pairs
    from diffgap.encoders.hf_clap import HFClapEncoder

    audio = tmp_path / "clips"
    audio.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        sf.write(audio / f"c{i}.wav", (0.1 * rng.standard_normal(8000)).astype(np.float32), 16000)
        (audio / f"c{i}.txt").write_text(f"sound number {i}\n")
    npz = tmp_path / "pairs.npz"
    assert cli.main(["embed", "--audio-dir", str(audio), "--out", str(npz), "--hf-clap", str(folders["musicldm"]), "--no-progress"]) == 0
    pairs = load_pairs(npz)
    enc = HFClapEncoder.load(folders["musicldm"])
    assert pairs.encoder["fingerprint"] == enc.fingerprint()
    np.testing.assert_allclose(pairs["text"][:1], enc.encode_text([str(pairs.captions[0])]), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(pairs["audio"], axis=1), 1.0, atol=1e-5)
    ckpt = tmp_path / "ckpt"
    assert cli.main(["train", "--data", str(npz), "--out", str(ckpt), "--preset", "clap-tiny-gen", "--steps", "2",
                     "--batch-size", "4", "--no-progress"]) == 0
    _, meta = load_checkpoint(ckpt)
    check_encoder(meta, enc.identity())                                      # the same CLAP passes
    with pytest.raises(UserError, match="trained on CLAP"):
        check_encoder(meta, HFClapEncoder.load(folders["audioldm"]).identity())


# ---- diffgap generate ----------------------------------------------------------------------------
def _captured_class_labels(pipe):
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["class_labels"].detach().clone())

    return seen, pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("kind", ["audioldm", "musicldm"])
def test_unet_receives_the_bridged_embedding(pipes, kind):
    from diffgap.generation_pipeline import GenerationSettings, generate

    pipe = pipes[kind]
    m = _model()
    seen, handle = _captured_class_labels(pipe)
    try:
        s = GenerationSettings(n=2, seeds=[4, 5], generator_guidance=2.5, **FAST)
        res = generate(["a dog barks", "a bell rings"], pipe, m, s, any_clap=True, progress=False)
    finally:
        handle.remove()
    B, N = 2, 2
    assert res.waveforms.shape == (B, N, int(AUDIO_S * res.sample_rate))
    cond = res.conditions.reshape(B * N, -1)
    # the bridged samples are independent of the generator: the same caption embeddings and seeds
    np.testing.assert_allclose(cond.reshape(B, N, -1), sample_conditions(m, res.text_embeddings, N, [4, 5], FAST["steps"]), atol=1e-6)
    assert len(seen) == FAST["num_inference_steps"]
    for labels in seen:                      # guidance: [negative rows; conditional rows]
        assert labels.shape == (2 * B * N, 512)
        np.testing.assert_allclose(labels[B * N:].numpy(), cond, atol=1e-6)
        text_rows = np.repeat(res.text_embeddings, N, axis=0)
        assert (np.abs(labels[B * N:].numpy() - text_rows).max(axis=1) > 1e-2).all()


def test_no_bridge_is_the_stock_generator(pipes):
    """--no-bridge reproduces AudioLDM's own prompt path (prompt strings in, same seeds)."""
    from diffgap.generation_pipeline import GenerationSettings, generate

    pipe = pipes["audioldm"]
    caps = ["a dog barks", "a bell rings"]
    res = generate(caps, pipe, None, GenerationSettings(n=1, seeds=[7], bridge=False, generator_guidance=2.5, **FAST), progress=False)
    gens = [torch.Generator("cpu").manual_seed(latent_seed(7, 0)) for _ in caps]
    stock = pipe(caps, num_inference_steps=2, audio_length_in_s=AUDIO_S, guidance_scale=2.5, generator=gens, output_type="np").audios
    np.testing.assert_allclose(res.waveforms[:, 0], stock, atol=1e-5)


def test_generation_is_deterministic_under_a_seed(pipes):
    from diffgap.generation_pipeline import GenerationSettings, generate

    m = _model()
    run = lambda seed: generate(["wind"], pipes["audioldm"], m, GenerationSettings(n=2, seeds=[seed], generator_guidance=1.0, **FAST),  # noqa: E731
                                any_clap=True, progress=False).waveforms
    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-6
    assert np.abs(a[0, 0] - a[0, 1]).max() > 1e-6


def test_cli_generate_writes_wavs_and_json(folders, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "ckpt", _model())
    out = tmp_path / "out"
    argv = ["generate", "a dog barks", "rain", "--generator", str(folders["audioldm"]), "--checkpoint", str(ckpt),
            "--out", str(out), "-n", "2", "--seed", "3", "4", "--steps", "3", "--inference-steps", "2",
            "--audio-length", str(AUDIO_S), "--no-progress"]
    assert cli.main(argv) == 2                                               # no CLAP fingerprint in the checkpoint
    assert "--any-clap" in capsys.readouterr().err
    assert cli.main(argv + ["--any-clap"]) == 0
    rec = json.loads((out / "generation.json").read_text())
    assert rec["settings"]["seeds"] == [3, 4] and rec["latent_seeds"][1] == [latent_seed(4, 0), latent_seed(4, 1)]
    assert rec["clap"]["fingerprint"] and rec["captions"] == ["a dog barks", "rain"]
    wav, sr = sf.read(out / rec["files"][1][1])
    assert sr == gf.VOCODER_RATE and len(wav) == int(AUDIO_S * sr)
    assert cli.main(argv + ["--any-clap"]) == 2                              # exists, no --overwrite


def test_cli_generate_names_what_is_missing(folders, tmp_path, capsys):
    import shutil

    base = ["generate", "x", "--no-bridge", "--out", str(tmp_path / "o")]
    assert cli.main(base + ["--generator", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(folders["audioldm"], broken)
    shutil.rmtree(broken / "vocoder")
    assert cli.main(base + ["--generator", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no vocoder/ folder" in err and "SpeechT5HifiGan" in err and len(err.splitlines()) == 1
    assert cli.main(["generate", "x", "--generator", str(folders["audioldm"]), "--out", str(tmp_path / "o2")]) == 2
    assert "--checkpoint" in capsys.readouterr().err


# ---- the raw-space prior table (both families) ----------------------------------------------------
def test_diversity_matches_pairwise_definition():
    from diffgap.generation_eval import diversity

    x = F.normalize(torch.randn(5, 3, 8), dim=-1).numpy()
    ref = np.mean([np.mean([1 - x[b, i] @ x[b, j] for i in range(3) for j in range(3) if i != j]) for b in range(5)])
    assert diversity(x) == pytest.approx(ref, abs=1e-6)
    assert diversity(np.repeat(x[:, :1], 3, axis=1)) == pytest.approx(0.0, abs=1e-6)


def test_raw_prior_table_video_to_audio():
    """CAVP (video -> audio): the same table; a head-space set that is the exact head image of the real
    targets maps back onto them (cosine 1, Frechet 0), which a wrong inverse would break."""
    from diffgap.generation_eval import DIFFGAP_ROW, raw_prior_table
    from diffgap.prior import frechet_distance

    m = _model(preset="cavp-tiny-gen")
    rng = np.random.default_rng(0)
    unit = lambda n: (lambda z: z / np.linalg.norm(z, axis=1, keepdims=True))(rng.standard_normal((n, 512))).astype(np.float32)  # noqa: E731
    test = {"video": unit(60), "audio": unit(60)}
    val = {"video": unit(60), "audio": unit(60)}
    with torch.no_grad():
        heads = {k: m.project(k, torch.from_numpy(v)).numpy() for k, v in test.items()}
    emb_test = {"raw": test, "single": {("bridge", d): heads[d.split("_given_")[0]] for d in m.config.directions}}
    cemb = {"reg": {d: heads[d.split("_given_")[0]] for d in m.config.directions}}
    ctl = {"raw_mean": {k: v.mean(0) for k, v in test.items()}}
    table = raw_prior_table(m, ctl, emb_test, cemb, {"raw": val}, n=3, steps=3)
    assert set(table["goal"]) == {"audio_given_video", "video_given_audio"}
    for r in table["rows"]:
        if r["row"] in ("posterior mean", "regression bridge"):
            assert r["cos_to_partner"] == pytest.approx(1.0, abs=1e-5) and r["frechet"] == pytest.approx(0.0, abs=1e-4)
        if r["row"] == DIFFGAP_ROW:
            assert r["diversity"] > 0
        if r["row"] == "real (val split)":
            tgt = r["direction"].split("_given_")[0]
            assert r["frechet"] == pytest.approx(frechet_distance(val[tgt], test[tgt]))


def test_raw_space_preset_keeps_identity_heads_through_training():
    """clap-tiny-raw: the heads stage is skipped and the heads stay the identity, so the denoisers'
    samples are raw-space samples (the map back is the identity)."""
    from diffgap.core.data import Pairs
    from diffgap.train_val import train_validated

    rng = np.random.default_rng(0)
    unit = lambda n: (lambda z: z / np.linalg.norm(z, axis=1, keepdims=True))(rng.standard_normal((n, 512))).astype(np.float32)  # noqa: E731
    mk = lambda n: Pairs({"text": unit(n), "audio": unit(n)}, np.array([str(i) for i in range(n)]))  # noqa: E731
    cfg = get_preset("clap-tiny-raw").replace(**{"train.max_denoiser_steps": 4, "train.val_every": 2})
    model, record = train_validated(cfg, mk(128), mk(32), progress=False)
    assert record["chosen"] == "two-stage" and record["candidates"]["two-stage"]["stages"]["heads"]["steps_run"] == 0
    for head in model.heads.heads.values():
        assert torch.equal(head.linear.weight, torch.eye(512)) and not head.linear.bias.any()
    x = F.normalize(torch.randn(8, 512), dim=-1)
    with torch.no_grad():
        assert torch.allclose(HeadInverse(model, "audio")(x), x, atol=1e-6)
    with pytest.raises(ValueError, match="identity heads"):
        get_preset("clap-tiny").replace(**{"heads.identity": True})
