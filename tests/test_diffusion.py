"""Diffusion math: schedules, forward process, parameterisations, DDIM sampler, guidance."""
import math

import numpy as np
import pytest
import torch

from diffgap.diffusion import DDIMSampler, NoiseSchedule, guided, timestep_start


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_alpha_bar_monotone_and_bounded(schedule):
    s = NoiseSchedule(schedule, 1000)
    ab = s.alphas_cumprod
    assert ab.shape == (1000,)
    assert np.all(np.diff(ab) < 0), "abar must strictly decrease with t"
    assert 0 < ab[-1] < 1e-2 and 0.99 < ab[0] < 1
    assert np.all((s.betas > 0) & (s.betas <= 0.999))


def test_cosine_endpoint_matches_closed_form():
    # Nichol & Dhariwal: abar(t) = f(t)/f(0); at t = T/2 that is cos^2((0.5+s)/(1+s) pi/2) / cos^2(s/(1+s) pi/2)
    s = NoiseSchedule("cosine", 1000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert s.alphas_cumprod[499] == pytest.approx(f(0.5) / f(0.0), rel=1e-6)


@pytest.mark.parametrize("t", [0, 250, 700, 999])
def test_q_sample_moments_match_closed_form(t):
    s = NoiseSchedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, generator=g).expand(200_000, 16)
    noise = torch.randn(200_000, 16, generator=g)
    xt = s.q_sample(x0, torch.full((200_000,), t), noise)
    ab = s.alphas_cumprod[t]
    # mean sqrt(abar) x0, variance 1 - abar; 200k samples: standard error ~ 0.0022 on the mean
    assert torch.allclose(xt.mean(0), math.sqrt(ab) * x0[0], atol=0.01)
    assert torch.allclose(xt.var(0), torch.full((16,), 1 - ab, dtype=torch.float32), rtol=0.02, atol=1e-3)
    # int t (graph-constant path) equals the tensor path
    assert torch.allclose(s.q_sample(x0[:4], t, noise[:4]), xt[:4], atol=1e-5)  # float64 vs float32 coefficients


@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_parameterisations_invert(prediction):
    s = NoiseSchedule("cosine", 1000, prediction)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 100, 300, 500, 700, 900, 980])
    xt = s.q_sample(x0, t, noise)
    y = s.target(x0, noise, t)
    assert torch.allclose(s.to_x0(y, xt, t), x0, atol=1e-6)
    assert torch.allclose(s.to_eps(x0, xt, t), noise, atol=1e-5)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="unknown schedule"):
        NoiseSchedule("quadratic")
    with pytest.raises(ValueError, match="unknown prediction"):
        NoiseSchedule("cosine", 1000, "score")
    s = NoiseSchedule()
    with pytest.raises(ValueError, match="outside"):
        s.q_sample(torch.zeros(1, 2), 1000, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="lie in"):
        s.q_sample(torch.zeros(1, 2), torch.tensor([-1]), torch.zeros(1, 2))


@pytest.mark.parametrize("k", [1, 2, 3, 10, 999, 1000])
def test_set_timesteps_trailing(k):
    d = DDIMSampler(NoiseSchedule())
    ts = d.set_timesteps(k)
    assert len(ts) == k and ts[0] == 999
    assert all(a > b for a, b in zip(ts, ts[1:])) and ts[-1] >= 0
    ts = d.set_timesteps(min(k, 300), start=299)
    assert ts[0] == 299 and len(ts) == min(k, 300)


def test_sampler_misuse_raises():
    d = DDIMSampler(NoiseSchedule())
    with pytest.raises(ValueError, match="set_timesteps"):
        d.step(torch.zeros(1, 2), 999, torch.zeros(1, 2))
    for bad in (0, -1, 1001):
        with pytest.raises(ValueError, match="num_steps"):
            d.set_timesteps(bad)
    with pytest.raises(ValueError, match="num_steps"):
        d.set_timesteps(301, start=299)
    d.set_timesteps(4)
    with pytest.raises(ValueError, match="not in the current schedule"):
        d.step(torch.zeros(1, 2), 500, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(NoiseSchedule(), eta=-0.1)
    with pytest.raises(ValueError, match="variance_noise"):
        d2 = DDIMSampler(NoiseSchedule(), eta=1.0)
        d2.set_timesteps(4)
        d2.step(torch.zeros(1, 2), d2.timesteps[0], torch.zeros(1, 2))
    with pytest.raises(ValueError, match="t0"):
        timestep_start(1000, 0.0)


def _diffusers_ddim(schedule: str, eta_steps: int):
    """diffusers' DDIMScheduler configured as DDIMSampler documents itself: trailing spacing, abar_prev = 1
    after the last step, x0 prediction, no clipping. Its betas come from diffusers' own schedule code."""
    from diffusers import DDIMScheduler

    beta_schedule = {"cosine": "squaredcos_cap_v2", "linear": "linear"}[schedule]
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=1e-4, beta_end=0.02,
                        timestep_spacing="trailing", set_alpha_to_one=True, prediction_type="sample",
                        clip_sample=False, thresholding=False)
    ref.set_timesteps(eta_steps)
    return ref


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_equals_diffusers(schedule):
    """Our betas (Nichol & Dhariwal cosine, DDPM linear) == diffusers' at T = 1000 (diffusers keeps float32)."""
    ref = _diffusers_ddim(schedule, 10)
    ours = NoiseSchedule(schedule, 1000)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("k", [1, 4, 10, 50])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_equals_diffusers(schedule, k, eta):
    """Step by step against diffusers' DDIMScheduler.step, with a network stand-in whose x0 estimate is
    wrong (a function of x_t), so every coefficient of every step shows in the result -- including the
    intermediate ones the final abar_prev = 1 step would hide from a check of the last output alone."""
    ours = DDIMSampler(NoiseSchedule(schedule, 1000), eta=eta)
    ref = _diffusers_ddim(schedule, k)
    # Same schedule values in both, so the comparison isolates the step arithmetic (the schedules
    # themselves are compared above at diffusers' float32 precision).
    ref.alphas_cumprod = torch.from_numpy(ours.schedule.alphas_cumprod)
    assert ours.set_timesteps(k) == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(k)
    x = x_ref = torch.randn(4, 6, generator=g, dtype=torch.float64)
    bias = torch.randn(1, 6, generator=g, dtype=torch.float64)
    for t in ours.timesteps:
        z = torch.randn(4, 6, generator=g, dtype=torch.float64) if eta > 0 else None
        x = ours.step(torch.tanh(0.7 * x) + bias, t, x, variance_noise=z)
        x_ref = ref.step(torch.tanh(0.7 * x_ref) + bias, t, x_ref, eta=eta, variance_noise=z).prev_sample
        torch.testing.assert_close(x, x_ref, rtol=1e-10, atol=1e-10, msg=f"step t={t}")


def test_ddim_eta_noise_enters_with_the_posterior_sigma():
    """eta = 1: the variance noise is added with DDIM eq. 16's sigma_t (checked in closed form for one step)."""
    s = NoiseSchedule("cosine", 1000)
    d = DDIMSampler(s, eta=1.0)
    t, prev = d.set_timesteps(4)[:2]
    x0, x = torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64)
    z = torch.ones(1, 3, dtype=torch.float64)
    a_t, a_prev = s.alphas_cumprod[t], s.alphas_cumprod[prev]
    sigma = math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    torch.testing.assert_close(d.step(x0, t, x, variance_noise=z), sigma * z, rtol=1e-12, atol=1e-12)


def test_guidance_scale_one_is_conditional():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    assert guided(u, c, 1.0) is c
    assert torch.allclose(guided(u, c, torch.tensor(1.0)), c, atol=1e-6)
    assert torch.allclose(guided(u, c, torch.ones(4, 1)), c, atol=1e-6)
    assert torch.allclose(guided(u, c, 0.0), u)
    assert torch.allclose(guided(u, c, torch.tensor([2.0])), u + 2 * (c - u))
