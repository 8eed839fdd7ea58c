"""Model, presets, bridge semantics, checkpoints and exportability of the fused sampler."""
import json

import numpy as np
import pytest
import torch

from diffgap.checkpoint import load_checkpoint, load_train_state, read_config, save_checkpoint
from diffgap.config import DEFAULT_PRESET, PRESETS, DiffGAPConfig, get_preset
from diffgap.models import DiffGAP, parse_direction

E = 512


def randomized(cfg: DiffGAPConfig, seed: int = 0) -> DiffGAP:
    """A model whose zero-initialised layers are perturbed, so bridge outputs are non-trivial."""
    torch.manual_seed(seed)
    m = DiffGAP(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for mod in cfg.modalities:  # plausible head-space statistics
            getattr(m, f"stats_mean_{mod}").copy_(0.01 * torch.randn(cfg.heads.dim))
            getattr(m, f"stats_std_{mod}").copy_(0.04 + 0.01 * torch.rand(cfg.heads.dim))
    return m.eval()


@pytest.fixture(scope="module")
def tiny():
    return randomized(get_preset("clap-tiny"))


def _inputs(model, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, E, generator=g), torch.randn(b, model.config.heads.dim, generator=g)


def test_registry_and_default_preset_size():
    assert DEFAULT_PRESET == "clap-512" and "clap-tiny" in PRESETS
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")
    counts = DiffGAP(get_preset("clap-512")).parameter_counts()
    for d in ("audio_given_text", "text_given_audio"):
        # a few million per direction (DiffGAP's small denoisers); 4.37M with the default settings
        assert 3_000_000 <= counts[d] <= 6_000_000, counts
    assert get_preset("clap-512").directions == ("audio_given_text", "text_given_audio")


def test_config_dict_round_trip_and_errors():
    cfg = get_preset("clap-tiny").replace(**{"diffusion.bridge_t0": 0.5})
    again = DiffGAPConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        DiffGAPConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="schedule"):
        cfg.replace(**{"diffusion.schedule": "sqrt"})
    with pytest.raises(ValueError, match="direction"):
        parse_direction("audio_from_text")


def test_project_is_unit_norm(tiny):
    x, _ = _inputs(tiny)
    for m in ("text", "audio"):
        h = tiny.project(m, x)
        assert h.shape == (6, 64)
        assert torch.allclose(h.norm(dim=-1), torch.ones(6), atol=1e-5)
    with pytest.raises(ValueError, match="unknown modality"):
        tiny.project("video", x)


@pytest.mark.parametrize("mode,k", [("noise", 1), ("noise", 3), ("noise", 10), ("source", 1), ("source", 4)])
def test_bridge_shapes_determinism_and_norm(tiny, mode, k):
    c, n = _inputs(tiny, b=4)
    with torch.no_grad():
        y1 = tiny.bridge("audio_given_text", c, n, steps=k, mode=mode)
        y2 = tiny.bridge("audio_given_text", c, n, steps=k, mode=mode)
        y3 = tiny.bridge("audio_given_text", c, torch.randn_like(n), steps=k, mode=mode)
    assert y1.shape == (4, 64) and torch.isfinite(y1).all()
    assert torch.equal(y1, y2), "bridge must be deterministic given the noise"
    assert not torch.equal(y1, y3)
    assert torch.allclose(y1.norm(dim=-1), torch.ones(4), atol=1e-5)


@pytest.mark.parametrize("mode,k", [("noise", 1000), ("source", 300)])
def test_bridge_accepts_every_timestep(tiny, mode, k):
    """K = T (from noise) and K = t0*T (from the source) are the largest valid step counts."""
    c, n = _inputs(tiny, b=2)
    with torch.no_grad():
        y = tiny.bridge("audio_given_text", c, n, steps=k, mode=mode)
    assert torch.isfinite(y).all() and torch.allclose(y.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_bridge_rejects_bad_steps_and_inputs(tiny):
    c, n = _inputs(tiny, b=2)
    for k in (0, -1, 1001):
        with pytest.raises(ValueError, match="num_steps"):
            tiny.bridge("audio_given_text", c, n, steps=k, mode="noise")
    with pytest.raises(ValueError, match="num_steps"):
        tiny.bridge("audio_given_text", c, n, steps=301, mode="source", t0=0.3)
    with pytest.raises(ValueError, match="unknown direction"):
        tiny.bridge("video_given_text", c, n)
    with pytest.raises(ValueError, match="condition must be"):
        tiny.bridge("audio_given_text", c[:, :10], n)
    with pytest.raises(ValueError, match="noise must be"):
        tiny.bridge("audio_given_text", c, n[:1])


def test_guidance_scale_one_equals_conditional_output(tiny):
    c, n = _inputs(tiny, b=5)
    with torch.no_grad():
        cond = tiny.bridge("text_given_audio", c, n, steps=3, guidance_scale=1.0)
        g1 = tiny.bridge("text_given_audio", c, n, steps=3, guidance_scale=torch.tensor(1.0))
        g1b = tiny.bridge("text_given_audio", c, n, steps=3, guidance_scale=torch.ones(5, 1))
        g3 = tiny.bridge("text_given_audio", c, n, steps=3, guidance_scale=3.0)
        g3t = tiny.bridge("text_given_audio", c, n, steps=3, guidance_scale=torch.tensor([3.0]))
    assert torch.allclose(g1, cond, atol=1e-5) and torch.allclose(g1b, cond, atol=1e-5)
    assert not torch.allclose(g3, cond, atol=1e-3)
    assert torch.allclose(g3, g3t, atol=1e-5)


@pytest.mark.parametrize("preset", ["clap-tiny", "clap-512"])
def test_stacked_guidance_pass_equals_two_branches(preset):
    """forward_guided (one (2B, .) pass, the sampler's CFG path) == the two separate branches."""
    model = randomized(get_preset(preset)) if preset != "clap-tiny" else randomized(get_preset(preset), seed=1)
    den = model.denoiser("audio_given_text")
    D = model.config.heads.dim
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(5, D, generator=g), torch.randn(5, D, generator=g)
    with torch.no_grad():
        for t in (torch.tensor([7]), torch.tensor([0, 3, 99, 500, 999])):  # shared and per-row timesteps
            out, out_u = den.forward_guided(x, t, cond)
            assert torch.allclose(out, den(x, t, cond), atol=1e-5)
            assert torch.allclose(out_u, den(x, t, cond, unconditional=True), atol=1e-5)


def test_eta_sampling_uses_the_generator_with_ddim_sigma(tiny):
    """eta = 1: each step adds one N(0, I) draw from ``generator`` scaled by DDIM's sigma_t. Checked against
    diffusers' DDIMScheduler.step fed the same draws, around the model's own denoiser and head maps."""
    from diffusers import DDIMScheduler

    assert tiny.config.diffusion.prediction == "x0"  # the network output is the x0 estimate (no conversion)
    c, n = _inputs(tiny, b=3)
    K = 4
    with torch.no_grad():
        ours = tiny.bridge("audio_given_text", c, n, steps=K, mode="noise", eta=1.0, guidance_scale=1.0,
                           generator=torch.Generator().manual_seed(1))
        ref = DDIMScheduler(num_train_timesteps=tiny.schedule.T, timestep_spacing="trailing", set_alpha_to_one=True,
                            prediction_type="sample", clip_sample=False)
        ref.alphas_cumprod = torch.from_numpy(tiny.schedule.alphas_cumprod)
        ref.set_timesteps(K)
        den, g = tiny.denoiser("audio_given_text"), torch.Generator().manual_seed(1)
        cond_z = tiny.standardize("text", tiny.project("text", c))
        x = n
        for t in ref.timesteps.tolist():
            x0 = tiny.renormalize("audio", den(x, torch.full((1,), t, dtype=torch.int64), cond_z))
            z = torch.randn(x.shape, generator=g, dtype=x.dtype)
            x = ref.step(x0.double(), t, x.double(), eta=1.0, variance_noise=z.double()).prev_sample.float()
        expected = torch.nn.functional.normalize(tiny.unstandardize("audio", x), dim=-1)
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
        deterministic = tiny.bridge("audio_given_text", c, n, steps=K, mode="noise", eta=0.0, guidance_scale=1.0)
        assert (ours - deterministic).abs().max() > 1e-3  # the draws do enter the sample


def test_config_change_save_reload_gives_identical_samples(tmp_path):
    cfg = get_preset("clap-tiny").replace(**{"diffusion.bridge_t0": 0.5, "diffusion.sample_steps": 3,
                                             "diffusion.schedule": "linear", "diffusion.bridge_mode": "source"})
    m = randomized(cfg, seed=3)
    save_checkpoint(tmp_path / "ck", m, {"step": 7})
    m2, meta = load_checkpoint(tmp_path / "ck")
    assert m2.config == cfg and meta["step"] == 7 and meta["preset"] == "clap-tiny"
    c, n = _inputs(m)
    with torch.no_grad():
        assert torch.equal(m.bridge("audio_given_text", c, n), m2.bridge("audio_given_text", c, n))
        # the changed setting matters: the default t0 gives other samples
        assert not torch.equal(m2.bridge("audio_given_text", c, n, t0=0.3), m2.bridge("audio_given_text", c, n))
    assert read_config(tmp_path / "ck") == cfg


def test_config_written_before_the_conditional_mean_branch_loads_as_trained():
    """A config.json from before ``denoiser.mean_hidden`` / ``train.terminal_t_frac`` existed describes
    denoisers without the branch, trained without terminal rows: it loads as such, not with today's defaults."""
    d = get_preset("clap-512").to_dict()
    del d["denoiser"]["mean_hidden"], d["train"]["terminal_t_frac"]
    d["train"]["source_t_frac"] = 0.5
    old = DiffGAPConfig.from_dict(d)
    assert old.denoiser.mean_hidden == 0 and old.train.terminal_t_frac == 0.0
    assert DiffGAP(old).denoiser("audio_given_text").mean is None
    assert get_preset("clap-512").denoiser.mean_hidden > 0


def test_checkpoint_round_trip_and_train_state(tmp_path, tiny):
    opt = torch.optim.AdamW(tiny.parameters(), lr=1e-3)
    tiny.zero_grad()
    tiny.project("text", torch.randn(4, E)).sum().backward()
    opt.step()
    state = {"live_model": tiny.state_dict(), "optimizer": opt.state_dict(), "json": {"step": 5},
             "tensors": {"rng.0": torch.Generator().manual_seed(1).get_state()}}
    save_checkpoint(tmp_path / "ck", tiny, {"step": 5}, train_state=state)
    m2, _ = load_checkpoint(tmp_path / "ck")
    for (k, v), (k2, v2) in zip(tiny.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    st = load_train_state(tmp_path / "ck")
    assert st["json"]["step"] == 5 and torch.equal(st["tensors"]["rng.0"], state["tensors"]["rng.0"])
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    opt2.load_state_dict(st["optimizer"])
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    assert {p.name for p in (tmp_path / "ck").iterdir()} == {"config.json", "model.safetensors", "train_state.safetensors"}


def test_checkpoint_errors(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    save_checkpoint(tmp_path / "ck", tiny)
    with pytest.raises(ValueError, match="preset 'clap-tiny', expected 'clap-512'"):
        load_checkpoint(tmp_path / "ck", expect_preset="clap-512")
    w = tmp_path / "ck" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_checkpoint(tmp_path / "ck")


class _Sampler(torch.nn.Module):
    """The thin wrapper an exporter puts around bridge (what diffgap.export does)."""

    def __init__(self, model, direction, steps):
        super().__init__()
        self.model, self.direction, self.steps = model, direction, steps

    def forward(self, condition, noise, guidance_scale):
        return self.model.bridge(self.direction, condition, noise, steps=self.steps, guidance_scale=guidance_scale)


def test_bridge_traces_and_exports_without_control_flow(tmp_path, tiny):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    w = _Sampler(tiny, "audio_given_text", 4).eval()
    c, n = _inputs(tiny, b=3)
    g = torch.full((3, 1), 2.0)
    traced = torch.jit.trace(w, (c, n, g))
    c5, n5 = _inputs(tiny, b=5, seed=9)
    g5 = torch.full((5, 1), 1.5)
    with torch.no_grad():
        ref = w(c5, n5, g5)
        assert torch.allclose(traced(c5, n5, g5), ref, atol=1e-6)
    path = tmp_path / "s.onnx"
    names = ["condition", "noise", "guidance_scale"]
    torch.onnx.export(w, (c, n, g), str(path), input_names=names, output_names=["embedding"],
                      dynamic_axes={k: {0: "batch"} for k in [*names, "embedding"]}, dynamo=False, opset_version=17)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not ops & {"Loop", "If", "Scan"}, ops
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"condition": c5.numpy(), "noise": n5.numpy(), "guidance_scale": g5.numpy()})[0]
    # fp32 graph vs eager: same ops, only reassociation differences
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5)


def test_stats_buffers_travel_with_the_checkpoint(tiny, tmp_path):
    """The head-space statistics are saved and loaded with their values (not the defaults a fresh
    model starts with), and they change what the bridge returns."""
    fresh = DiffGAP(tiny.config).eval()
    save_checkpoint(tmp_path / "ck", tiny, {"step": 1})
    loaded, _ = load_checkpoint(tmp_path / "ck")
    for m in tiny.config.modalities:
        for stat in ("mean", "std"):
            want = getattr(tiny, f"stats_{stat}_{m}")
            assert not torch.equal(want, getattr(fresh, f"stats_{stat}_{m}")), (stat, m)
            assert torch.equal(getattr(loaded, f"stats_{stat}_{m}"), want), (stat, m)
    c, n = _inputs(tiny)
    with torch.no_grad():
        ref = tiny.bridge("audio_given_text", c, n)
        assert torch.equal(loaded.bridge("audio_given_text", c, n), ref)
        fresh.load_state_dict({k: v for k, v in tiny.state_dict().items() if not k.startswith("stats_")}, strict=False)
        assert not torch.allclose(fresh.bridge("audio_given_text", c, n), ref, atol=1e-3)  # the statistics matter
