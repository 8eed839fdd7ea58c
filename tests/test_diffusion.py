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


@pytest.mark.parametrize("k", [1, 4, 25])
def test_ddim_with_oracle_x0_recovers_x0(k):
    """With the exact x0 at every step, deterministic DDIM lands on x0 for any K."""
    s = NoiseSchedule()
    d = DDIMSampler(s)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 7, generator=g, dtype=torch.float64)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    for t in d.set_timesteps(k):
        x = d.step(x0, t, x)
    assert torch.allclose(x, x0, atol=1e-9)


def test_ddim_deterministic_for_fixed_seed_with_eta():
    s = NoiseSchedule()

    def run(seed):
        d = DDIMSampler(s, eta=1.0)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(3, 4, generator=g)
        for t in d.set_timesteps(5):
            x = d.step(torch.tanh(x), t, x, variance_noise=torch.randn(3, 4, generator=g))
        return x

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_guidance_scale_one_is_conditional():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    assert guided(u, c, 1.0) is c
    assert torch.allclose(guided(u, c, torch.tensor(1.0)), c, atol=1e-6)
    assert torch.allclose(guided(u, c, torch.ones(4, 1)), c, atol=1e-6)
    assert torch.allclose(guided(u, c, 0.0), u)
    assert torch.allclose(guided(u, c, torch.tensor([2.0])), u + 2 * (c - u))
