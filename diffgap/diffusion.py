"""Diffusion math, kept apart from the network: noise schedule, forward process, DDIM sampler.

Nothing here knows about the denoiser. :class:`NoiseSchedule` holds the discrete schedule
(T steps, cosine or linear), the forward process ``q_sample`` and the conversions between the three
parameterisations (eps / x0 / v). :class:`DDIMSampler` follows diffusers' ``scheduling_ddim.py``
shape: ``set_timesteps(K)`` then one ``step`` per timestep, and raises ``ValueError`` on misuse.

Conventions: ``x0`` is the clean sample, ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with
``eps ~ N(0, I)`` and ``t`` an integer in ``[0, T-1]`` (``abar_t`` = ``alphas_cumprod[t]``).
Coefficients for python-int timesteps are python floats, so a traced/exported sampler loop turns
them into graph constants (no gathers, no control flow).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .config import PREDICTIONS, SCHEDULES, DiffusionConfig


# ---- schedules ------------------------------------------------------------------------------
def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved-DDPM cosine schedule (Nichol & Dhariwal 2021, eq. 17): abar(t) = f(t)/f(0),
    f(t) = cos^2(((t/T + s)/(1 + s)) * pi/2); betas clipped at 0.999 as in the paper (avoids the
    singularity at t = T). Offset s = 0.008 is the paper's value."""
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1.0 - f(i + 1) / f(i), max_beta) for i in range(T)], dtype=np.float64)


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM linear schedule (Ho et al. 2020): betas from 1e-4 to 0.02, scaled for T != 1000 as in
    improved-DDPM so that the total noise level stays comparable."""
    scale = 1000.0 / T
    return np.linspace(beta_start * scale, beta_end * scale, T, dtype=np.float64)


class NoiseSchedule:
    """Discrete noise schedule with the forward process and parameterisation conversions."""

    def __init__(self, schedule: str = "cosine", num_train_timesteps: int = 1000, prediction: str = "x0"):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; use one of {PREDICTIONS}")
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        self.schedule = schedule
        self.prediction = prediction
        self.T = int(num_train_timesteps)
        betas = cosine_betas(self.T) if schedule == "cosine" else linear_betas(self.T)
        self.betas = betas
        self.alphas_cumprod = np.cumprod(1.0 - betas)  # abar_t, (T,) float64
        self._abar = torch.from_numpy(self.alphas_cumprod)  # float64, indexed then cast per call

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "NoiseSchedule":
        return cls(cfg.schedule, cfg.num_train_timesteps, cfg.prediction)

    # -- per-timestep coefficients ------------------------------------------------------------
    def abar(self, t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor | float:
        """abar_t as a python float (int t: becomes a graph constant) or a (B, 1) tensor (tensor t)."""
        if isinstance(t, int):
            self._check_t(t)
            return float(self.alphas_cumprod[t])
        if t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"timesteps must be integer, got {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.T):
            raise ValueError(f"timesteps must lie in [0, {self.T - 1}], got range [{int(t.min())}, {int(t.max())}]")
        return self._abar.to(like.device)[t.long()].to(like.dtype).reshape(-1, 1)

    def _check_t(self, t: int) -> None:
        if not 0 <= t < self.T:
            raise ValueError(f"timestep {t} outside [0, {self.T - 1}]")

    @staticmethod
    def _sqrt(a: torch.Tensor | float) -> torch.Tensor | float:
        return math.sqrt(a) if isinstance(a, float) else a.sqrt()

    # -- forward process ----------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM eq. 4).  x0, noise: (B, D); t: int or (B,)."""
        a = self.abar(t, x0)
        return self._sqrt(a) * x0 + self._sqrt(1.0 - a) * noise

    # -- parameterisations --------------------------------------------------------------------
    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """What the network is trained to output under ``self.prediction``."""
        if self.prediction == "x0":
            return x0
        if self.prediction == "eps":
            return noise
        a = self.abar(t, x0)  # v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)
        return self._sqrt(a) * noise - self._sqrt(1.0 - a) * x0

    def to_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Convert the network output at (x_t, t) to a clean-sample estimate x0_hat."""
        if self.prediction == "x0":
            return model_output
        a = self.abar(t, x_t)
        if self.prediction == "eps":
            return (x_t - self._sqrt(1.0 - a) * model_output) / self._sqrt(a)
        return self._sqrt(a) * x_t - self._sqrt(1.0 - a) * model_output

    def to_eps(self, x0: torch.Tensor, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """eps implied by (x_t, x0_hat): inverts q_sample (DDIM eq. 12's predicted noise)."""
        a = self.abar(t, x_t)
        return (x_t - self._sqrt(a) * x0) / self._sqrt(1.0 - a)


def timestep_start(T: int, t0: float) -> int:
    """The integer start timestep for SDEdit-style bridging from a noised source at ``t0 * T``."""
    if not 0.0 < t0 <= 1.0:
        raise ValueError(f"t0 must be a fraction of T in (0, 1], got {t0}")
    return max(0, min(T - 1, int(round(t0 * T)) - 1))


class DDIMSampler:
    """Deterministic (eta=0) or stochastic DDIM (Song, Meng & Ermon 2021, eq. 12).

    Usage::

        sampler.set_timesteps(K)                    # or set_timesteps(K, start=299) to start at t=299
        for t in sampler.timesteps:                 # python ints, descending
            x0 = ...network's clean estimate at (x, t)...
            x = sampler.step(x0, t, x)
        # after the last step x is the final sample (the last step goes to abar = 1)

    Spacing is "trailing" (Lin et al. 2024, "Common diffusion noise schedules and sample steps are
    flawed", Table 2): the first step is always at ``start`` (T-1 when sampling from pure noise).
    """

    def __init__(self, schedule: NoiseSchedule, eta: float = 0.0):
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.schedule = schedule
        self.eta = float(eta)
        self.timesteps: list[int] | None = None

    def set_timesteps(self, num_steps: int, start: int | None = None) -> list[int]:
        T = self.schedule.T
        start = T - 1 if start is None else int(start)
        if not 0 <= start < T:
            raise ValueError(f"start timestep {start} outside [0, {T - 1}]")
        if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool):
            raise ValueError(f"num_steps must be an int, got {type(num_steps).__name__}")
        if not 1 <= num_steps <= start + 1:
            raise ValueError(
                f"num_steps={num_steps} is invalid: use 1 <= K <= {start + 1} "
                f"(the number of timesteps from {start} down to 0)"
            )
        n = start + 1
        # t_i = start - floor(i * n / K): strictly decreasing (n/K >= 1), t_0 = start.
        self.timesteps = [start - (i * n) // num_steps for i in range(num_steps)]
        return self.timesteps

    def prev_timestep(self, t: int) -> int:
        """The next (lower) timestep in the schedule, or -1 for the final step (abar_prev = 1)."""
        if self.timesteps is None:
            raise ValueError("call set_timesteps(K) before step()")
        try:
            i = self.timesteps.index(int(t))
        except ValueError:
            raise ValueError(f"timestep {t} is not in the current schedule {self.timesteps[:8]}...") from None
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1

    def step(self, x0: torch.Tensor, t: int, x_t: torch.Tensor, variance_noise: torch.Tensor | None = None) -> torch.Tensor:
        """One DDIM update x_t -> x_{prev}.  x0 (the clean estimate, already clipped/renormalised), x_t: (B, D)."""
        if not isinstance(t, (int, np.integer)):
            raise ValueError("step() takes python-int timesteps from sampler.timesteps")
        t = int(t)
        prev = self.prev_timestep(t)
        sched = self.schedule
        # 1. abar at t and at the previous (lower) step; abar_prev = 1 after the last step
        #    ("set_alpha_to_one": the final step returns the clean estimate itself).
        a_t = float(sched.alphas_cumprod[t])
        a_prev = float(sched.alphas_cumprod[prev]) if prev >= 0 else 1.0
        # 2. predicted noise from (x_t, x0) -- DDIM eq. 12, "predicted x0" term inverted. Recomputing
        #    it from the renormalised x0 keeps x_prev consistent with the clipped estimate.
        eps = (x_t - math.sqrt(a_t) * x0) / math.sqrt(1.0 - a_t)
        # 3. sigma_t (DDIM eq. 16); eta = 0 gives the deterministic DDIM, eta = 1 DDPM's posterior.
        sigma = self.eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t)) * math.sqrt(max(0.0, 1.0 - a_t / a_prev))
        # 4. "direction pointing to x_t" (DDIM eq. 12, middle term)
        dir_coef = math.sqrt(max(0.0, 1.0 - a_prev - sigma**2))
        # 5. x_prev = sqrt(abar_prev) x0 + direction + sigma z (DDIM eq. 12)
        x_prev = math.sqrt(a_prev) * x0 + dir_coef * eps
        if sigma > 0.0:
            if variance_noise is None:
                raise ValueError("eta > 0 needs variance_noise (B, D) for each step; pass a seeded draw")
            x_prev = x_prev + sigma * variance_noise
        return x_prev


def guided(uncond: torch.Tensor, cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + s (cond - uncond).

    ``scale`` may be a python float or a tensor of shape (), (1,), (B,) or (B, 1) (an exported
    graph input); a python 1.0 returns ``cond`` exactly.
    """
    if isinstance(scale, (int, float)):
        if float(scale) == 1.0:
            return cond
        return uncond + float(scale) * (cond - uncond)
    s = scale.to(cond.dtype).reshape(-1, 1)  # (1, 1) or (B, 1): broadcasts over D
    return uncond + s * (cond - uncond)


def timesteps_summary(ts: Sequence[int]) -> str:
    return ",".join(str(int(t)) for t in ts)
