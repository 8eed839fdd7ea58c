"""Video<->audio export with the same checks as text<->audio: the tiny CAVP encoders and a cavp-tiny DiffGAP
through ``export_all`` -- both CAVP towers and both fused samplers, FP32 + FP16, parity at B = 1, 3, 8,
the TensorRT lint and the manifest -- and the torch-free runtime bridges on the exported graphs."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

import cavp_fixtures
from diffgap.core.errors import UserError
from diffgap.core.names import head_name
from diffgap.encoders.cavp import CavpEncoder
from diffgap.export import check as chk
from diffgap.export.cli import export_all
from diffgap.export.fused import FusedSampler
from diffgap.core.manifest import Manifest
from diffgap.runtime import AudioToVideoBridge, VideoToAudioBridge, make_noise

MODELS = {"cavp_video_encoder", "cavp_audio_encoder", "diffgap_video_to_audio", "diffgap_audio_to_video",
          head_name("video"), head_name("audio")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return cavp_fixtures.shared_export(tmp_path_factory)


@pytest.fixture(scope="module")
def torch_side(exported):
    """The PyTorch modules the export was made from: the same seeded tiny encoders and the checkpoint."""
    from diffgap.checkpoint import load_checkpoint

    model, _ = load_checkpoint(exported[0])
    return CavpEncoder.from_config("tiny", seed=0), model


def test_export_writes_every_cavp_model_fp32_fp16_with_manifest(exported):
    _, res = exported
    man = Manifest.load(res.out, verify=True)
    assert set(man.models) == MODELS
    assert man.preset == "cavp-tiny" and man.extra["encoder_family"] == "cavp"
    assert "tokenizer" not in man.assets
    for name, entry in man.models.items():
        assert set(entry.files) == {"fp32", "fp16"}
        for prec in ("fp32", "fp16"):
            path = man.path(name, prec)
            meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            assert meta["diffgap.model"] == name and meta["diffgap.preset"] == "cavp-tiny"
            assert meta["diffgap.precision"] == prec
            # I/O exactly as declared: names and element types from the IOSpec
            g = onnx.load(str(path), load_external_data=False).graph
            assert [i.name for i in g.input] == entry.io.input_names
            assert [o.name for o in g.output] == entry.io.output_names
            assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in [*g.input, *g.output])
    assert man.model("cavp_video_encoder").meta["cavp_config"] == "tiny"
    assert man.model("diffgap_video_to_audio").meta["direction"] == "audio_given_video"
    assert man.model("diffgap_audio_to_video").meta["direction"] == "video_given_audio"


def test_parity_fp16_bounds_and_lint(exported):
    _, res = exported
    par = res.parity
    assert set(par["models"]) == MODELS  # export_all(check=True) raised unless all were ok: check the figures
    for name, row in par["models"].items():
        assert row["batches"] == [1, 3, 8]
        assert row["fp32_max_abs"] <= chk.FP32_MAX_ABS, name
        bound = chk.FP16_MIN_COS_DENOISER if name.startswith("diffgap_") else chk.FP16_MIN_COS_ENCODER
        assert row["fp16_bound"] == bound and row["fp16_min_cos"] >= bound, name
    # the samplers' FP16 figure is real FP16 arithmetic (reference evaluator)
    assert par["models"]["diffgap_video_to_audio"]["fp16_measure"] == chk.MEASURE_FP16_REF
    assert len(res.lint) == 2 * len(MODELS) and all(rep["ok"] for rep in res.lint.values())
    assert "cavp_video_encoder" in res.table and "diffgap_audio_to_video" in res.table


def test_fp16_audio_graph_keeps_the_mel_front_end_fp32(exported):
    _, res = exported
    man = Manifest.load(res.out)
    m = onnx.load(str(man.path("cavp_audio_encoder", "fp16")))
    meta = {p.key: p.value for p in m.metadata_props}
    assert int(meta["diffgap.fp16_fp32_pinned_nodes"]) > 0
    fp16_inits = {i.name for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    front = [n for n in m.graph.node if n.name.startswith("/mel/") or "/spec_encoder/bn/" in n.name]
    assert front and not any(x in fp16_inits for n in front for x in n.input)
    # ... while the CNN trunk really is FP16
    assert any(x in fp16_inits for n in m.graph.node if "/conv_block" in n.name and n.op_type == "Conv" for x in n.input)


def _frames(spec, batch, seed):
    return np.random.default_rng(seed).integers(0, 256, spec.concrete(batch), dtype=np.uint8)


def test_runtime_bridges_match_pytorch(exported, torch_side):
    _, res = exported
    enc, model = torch_side
    man = Manifest.load(res.out)
    with VideoToAudioBridge(man) as v2a, AudioToVideoBridge(man) as a2v:
        spec = v2a.encoder.io.inputs[0]
        frames_u8 = _frames(spec, 3, 1)
        frames = frames_u8.astype(np.float32) / 255.0
        np.testing.assert_array_equal(v2a.encode(frames_u8), v2a.encode(frames))
        video_emb = v2a.encode(frames)
        assert np.abs(video_emb - enc.encode_video(frames)).max() <= 1e-4
        wav = np.random.default_rng(2).uniform(-0.5, 0.5, a2v.encoder.io.inputs[0].concrete(3)).astype(np.float32)
        audio_emb = a2v.encode(wav)
        assert np.abs(audio_emb - enc.encode_audio(wav)).max() <= 1e-4
        for bridge, emb in ((v2a, video_emb), (a2v, audio_emb)):
            seeds = [0, 5, 9]
            out = bridge(frames if bridge is v2a else wav, seed=seeds, guidance_scale=2.0)
            sampler = FusedSampler(model, f"{bridge.target}_given_{bridge.source}", cavp_fixtures.STEPS)
            noise = make_noise(seeds, 3, bridge.head_dim)
            with torch.no_grad():
                ref, proj = sampler(torch.from_numpy(emb), torch.from_numpy(noise), torch.full((3, 1), 2.0))
            assert np.abs(out.bridged - ref.numpy()).max() <= 1e-4
            assert np.abs(out.projected - proj.numpy()).max() <= 1e-4
            np.testing.assert_allclose(np.linalg.norm(out.bridged, axis=1), 1.0, atol=1e-5)


def test_runtime_decodes_video_files(exported, tmp_path):
    pytest.importorskip("av")  # PyAV writes the test video
    from test_video import write_video

    from diffgap.core.video import load_audio_track, load_frames

    _, res = exported
    path = write_video(tmp_path / "clip.mp4", seconds=1.5, audio_rate=16000)
    with VideoToAudioBridge(res.out) as v2a, AudioToVideoBridge(res.out) as a2v:
        c = v2a.cavp_config()
        frames = load_frames(path, fps=c["fps"], size=c["image_size"], num_frames=c["num_frames"])
        np.testing.assert_array_equal(v2a.encode([path]), v2a.encode(frames[None]))
        n = a2v.encoder.io.inputs[0].feature_shape[0]
        x = load_audio_track(path, sample_rate=c["sample_rate"], duration=n / c["sample_rate"])
        wav = np.zeros((1, n), np.float32)
        wav[0, : min(n, x.size)] = x[:n]
        np.testing.assert_array_equal(a2v.encode(str(path)), a2v.encode(wav))
        silent = write_video(tmp_path / "silent.mp4", seconds=1.0, audio=None)
        with pytest.raises(ValueError, match="no-audio-stream"):
            a2v.encode([silent])


def test_runtime_bad_inputs(exported):
    _, res = exported
    with VideoToAudioBridge(res.out) as v2a, AudioToVideoBridge(res.out) as a2v:
        spec = v2a.encoder.io.inputs[0]
        with pytest.raises(ValueError, match="frames must be"):
            v2a.encode(np.zeros((1, *spec.feature_shape[:-1], spec.feature_shape[-1] + 1), np.float32))
        with pytest.raises(ValueError, match="float in"):
            v2a.encode(np.zeros(spec.concrete(1), np.int32))
        bad = np.zeros(spec.concrete(1), np.float32)
        bad[0, 0, 0, 0, 0] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            v2a.encode(bad)
        with pytest.raises(ValueError, match="waveforms must be"):
            a2v.encode(np.zeros((1, 7), np.float32))
        with pytest.raises(ValueError, match="no audio given"):
            a2v.encode([])
        with pytest.raises(ValueError, match="missing"):
            v2a.encode(["/nonexistent/video.mp4"])


def test_runtime_bridges_are_torch_free(exported):
    _, res = exported
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from diffgap.runtime import VideoToAudioBridge, AudioToVideoBridge\n"
        f"b = VideoToAudioBridge({str(res.out)!r})\n"
        "x = np.zeros(b.encoder.io.inputs[0].concrete(2), np.float32)\n"
        "r = b(x); assert r.bridged.shape == (2, b.head_dim)\n"
        f"a = AudioToVideoBridge({str(res.out)!r})\n"
        "r = a(np.zeros(a.encoder.io.inputs[0].concrete(1), np.float32)); assert r.bridged.shape == (1, a.head_dim)\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_encoder_choice_errors(exported, tmp_path):
    ckpt, _ = exported
    with pytest.raises(FileNotFoundError, match="neither one of"):
        export_all(ckpt, tmp_path / "x", encoders="htsat-tiny")
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="Diff-Foley CAVP checkpoint|CAVP checkpoint"):
        bad = tmp_path / "bad.ckpt"
        torch.save({"state_dict": {"video_encoder.conv1.conv.weight": torch.zeros(1)}}, bad)
        export_all(ckpt, tmp_path / "y", encoders=str(bad))
    assert not (tmp_path / "y").exists()


def test_samplers_only_export_has_no_encoders(exported, tmp_path):
    ckpt, _ = exported
    res = export_all(ckpt, tmp_path / "s", steps=1, encoders=None, fp16=False)
    assert set(res.manifest.models) == {"diffgap_video_to_audio", "diffgap_audio_to_video", head_name("video"), head_name("audio")}
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["extra"]["encoder_family"] == "cavp"
