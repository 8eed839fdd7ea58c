"""A tiny real training run on CPU, the LR schedule, exact resumption and the train CLI."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from diffgap import synth
from diffgap.checkpoint import load_checkpoint
from diffgap.cli import main as cli_main
from diffgap.config import get_preset
from diffgap.train import lr_at, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    synth.write(d, replace(synth.SynthConfig(), n_train=1500, n_val=100, n_test=100))
    return d


def _tiny(steps=60):
    cfg = get_preset("clap-tiny")
    return cfg.replace(**{"train.steps": steps})


def test_short_training_run_lowers_the_loss(data):
    from diffgap.core.data import load_pairs

    res = train(_tiny(80), load_pairs(data / "train.npz"), progress=False, log_every=1)
    tot = np.array([h["total"] for h in res.history])
    assert len(tot) == 80 and np.isfinite(tot).all()
    assert tot[-10:].mean() < 0.8 * tot[:10].mean(), (tot[:10].mean(), tot[-10:].mean())
    # the denoisers learn to identify their pairs: the InfoNCE on their x0 estimates falls (the MSE,
    # 70% of it at t = T-1 where it is the conditional variance, barely moves in 80 tiny steps)
    x0nce = np.array([h["x0nce_audio_given_text"] for h in res.history])
    assert x0nce[-10:].mean() < 0.8 * x0nce[:10].mean()
    assert not res.model.training


def test_lr_schedule_warmup_then_cosine():
    cfg = get_preset("clap-512").train
    assert lr_at(0, cfg) == pytest.approx(cfg.lr / cfg.warmup_steps)
    assert lr_at(cfg.warmup_steps - 1, cfg) == pytest.approx(cfg.lr)
    assert lr_at(cfg.warmup_steps, cfg) == pytest.approx(cfg.lr)
    assert lr_at(cfg.steps, cfg) == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    lrs = [lr_at(s, cfg) for s in range(cfg.warmup_steps, cfg.steps)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_resume_is_bit_identical_to_an_uninterrupted_run(data, tmp_path):
    from diffgap.core.data import load_pairs

    pairs = load_pairs(data / "train.npz")
    cfg = _tiny(30)
    straight = train(cfg, pairs, out=tmp_path / "a", progress=False)
    part = train(cfg, pairs, out=tmp_path / "b", progress=False, stop_after=12)
    assert part.steps == 12 and load_checkpoint(tmp_path / "b")[1]["step"] == 12
    resumed = train(cfg, pairs, out=tmp_path / "b", progress=False, resume=True)
    assert resumed.steps == 30
    for (k, v), (_, w) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(v, w), k
    with pytest.raises(FileNotFoundError, match="--resume needs"):
        train(cfg, pairs, out=tmp_path / "none", progress=False, resume=True)


def test_train_cli_writes_a_loadable_checkpoint(data, tmp_path, capsys):
    rc = cli_main(["train", "--data", str(data / "train.npz"), "--out", str(tmp_path / "ck"), "--preset", "clap-tiny",
                   "--steps", "5", "--no-progress", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "parameters: heads" in out and "checkpoint:" in out
    model, meta = load_checkpoint(tmp_path / "ck")
    assert meta["step"] == 5 and meta["preset"] == "clap-tiny" and model.config.train.steps == 5
    assert int(model.stats_updates) == 5


def test_train_cli_refuses_bad_data(tmp_path, capsys):
    from diffgap.core.data import save_pairs

    rng = np.random.default_rng(0)
    save_pairs(tmp_path / "small.npz", ids=[str(i) for i in range(10)], text=rng.standard_normal((10, 16)),
               audio=rng.standard_normal((10, 16)))
    rc = cli_main(["train", "--data", str(tmp_path / "small.npz"), "--out", str(tmp_path / "ck"), "--preset", "clap-tiny"])
    assert rc == 2
    out, err = capsys.readouterr()
    assert "input widths from" in out and "text 16, audio 16" in out  # any width: taken from the data
    assert "10 pairs, fewer than batch size 64" in err and "Traceback" not in err


@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_denoiser_loss_regresses_diffusers_target(prediction):
    """The diffusion term is the MSE between the denoiser's output at diffusers' ``add_noise`` x_t and
    diffusers' training target for that parameterisation (x0 / the noise / ``get_velocity``), the
    schedule built by diffusers' own cosine code. The draws (t, noise, kept conditions) are taken from
    the same generator in the order ``denoiser_loss`` takes them."""
    from diffusers import DDPMScheduler

    from diffgap.diffusion import timestep_start
    from diffgap.models import DiffGAP, parse_direction
    from diffgap.train import denoiser_loss, sample_timesteps

    cfg = _tiny(1).replace(**{"diffusion.prediction": prediction})
    torch.manual_seed(0)
    model = DiffGAP(cfg).eval()
    B, D = 32, cfg.heads.dim
    h = {m: torch.nn.functional.normalize(torch.randn(B, D), dim=-1) for m in cfg.modalities}
    for m in cfg.modalities:
        model.update_stats(m, h[m])
    _, parts = denoiser_loss(model, h, torch.Generator().manual_seed(7))

    ddpm = DDPMScheduler(num_train_timesteps=cfg.diffusion.num_train_timesteps, beta_schedule="squaredcos_cap_v2")
    g = torch.Generator().manual_seed(7)
    direction = cfg.directions[0]
    target, source = parse_direction(direction)
    nd = min(cfg.train.denoiser_batch_size, B)
    x0, cond = model.standardize(target, h[target][:nd]), model.standardize(source, h[source][:nd])
    t = sample_timesteps(nd, model.schedule.T, cfg.train, timestep_start(model.schedule.T, cfg.diffusion.bridge_t0), g)
    noise = torch.randn(x0.shape, generator=g)
    keep = torch.rand(nd, generator=g) >= cfg.denoiser.cond_dropout
    x_t = ddpm.add_noise(x0, noise, t)
    want = {"x0": x0, "eps": noise, "v": ddpm.get_velocity(x0, noise, t)}[prediction]
    with torch.no_grad():
        out = model.denoiser(direction)(x_t, t, cond, keep=keep)
        ref = torch.nn.functional.mse_loss(out, want).item()
    assert parts[f"diff_{direction}"] == pytest.approx(ref, rel=1e-4)
    wrong = {"x0": noise, "eps": x0, "v": noise}[prediction]  # a mixed-up target is told apart
    assert torch.nn.functional.mse_loss(out, wrong).item() != pytest.approx(ref, rel=1e-2)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_other_parameterisations_train_and_sample(data, prediction):
    """The training loop and the sampler run end to end with eps / v (what they optimise is checked
    against diffusers above; the x0 conversions against each other in tests/test_diffusion.py)."""
    from diffgap.core.data import load_pairs

    cfg = _tiny(10).replace(**{"diffusion.prediction": prediction})
    res = train(cfg, load_pairs(data / "train.npz"), progress=False, log_every=1)
    assert len(res.history) == 10 and all(np.isfinite(h["total"]) for h in res.history)
    assert res.model.schedule.prediction == prediction
    with torch.no_grad():
        y = res.model.bridge("audio_given_text", torch.randn(3, 512), torch.randn(3, 64), steps=5, mode="noise")
    assert torch.isfinite(y).all()
