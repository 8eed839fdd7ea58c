"""Training: the DiffGAP loss, AdamW with warm-up + cosine LR, EMA weights, gradient clipping,
seeded batches, resumable safetensors checkpoints and multi-process data parallelism.

Multi-process: launch with ``torchrun --nproc_per_node N -m diffgap.cli train ...``; the loop reads
``WORLD_SIZE``/``RANK`` from the environment, joins a gloo process group (CPU) and averages
gradients with one flat ``all_reduce`` per step (the model is called through ``project`` /
``predict_x0`` rather than ``forward``, so DistributedDataParallel's forward hook does not apply).
Each rank draws its own batches (seed + rank); rank 0 writes checkpoints.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint, load_train_state, save_checkpoint
from .config import DiffGAPConfig, TrainConfig
from .core.data import Pairs
from .diffusion import timestep_start
from .models import DiffGAP, parse_direction

log = logging.getLogger(__name__)


# ---- loss -----------------------------------------------------------------------------------
def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): rows of a (B, D) and b (B, D) are positives, unit-norm inputs."""
    logits = scale * a @ b.T  # (B, B)
    y = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y))


def sample_timesteps(n: int, T: int, cfg: TrainConfig, t_start: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) int64: a ``terminal_t_frac`` share at T-1 (where the x0 estimate is the posterior mean the
    retrieval bridge uses), a ``source_t_frac`` share uniform on [0, t_start] (the range a bridge
    from the noised source visits), the rest uniform on [0, T-1]."""
    u = torch.randint(0, T, (n,), generator=generator)
    low = torch.randint(0, t_start + 1, (n,), generator=generator)
    r = torch.rand(n, generator=generator)
    t = torch.where(r < cfg.source_t_frac, low, u)
    return torch.where(r >= 1.0 - cfg.terminal_t_frac, torch.full_like(u, T - 1), t)


def diffgap_loss(
    model: DiffGAP, batch: dict[str, torch.Tensor], generator: torch.Generator, update_stats: bool = True
) -> tuple[torch.Tensor, dict[str, float]]:
    r"""The DiffGAP training loss for one batch of pairs ``batch[m]: (B, E)``.

    .. math::

        L = \mathrm{NCE}_\tau(h_a, h_b)
            + \sum_{d \in \{b|a,\ a|b\}} \Big[ \tfrac{1}{D}\lVert f_d(x_t, t, c) - y_t \rVert^2
            + \lambda\, \mathbb{1}[t > T/2]\, \mathrm{NCE}^{\to}_{\tau}(\hat h_0, h_{tgt}) \Big]

    * ``NCE_tau`` -- symmetric InfoNCE between the L2-normalised head outputs of the two
      modalities with the learnable CLIP temperature: it trains the heads (the contrastive space).
    * diffusion term -- per direction d = target|source, on the first ``denoiser_batch_size`` rows:
      ``x0`` = standardised head embedding of the target, ``c`` = standardised head embedding of
      the source (replaced by the learned null with probability ``cond_dropout``),
      ``x_t = q_sample(x0, t, eps)``; ``y_t`` is x0 / eps / v per ``diffusion.prediction``;
      t from :func:`sample_timesteps`. Averaged over rows and coordinates.
    * ``lambda * NCE->`` -- one-way InfoNCE from the predicted clean embedding ``h0_hat`` (the x0
      estimate, un-standardised and L2-normalised) to the batch's true target embeddings, only on
      rows with t > ``x0_infonce_min_t`` * T and the condition kept. Why: at high noise x_t says
      almost nothing about x0, so the MSE alone is minimised by a blurry conditional mean; the
      contrastive term rewards x0 estimates that *identify* their pair, i.e. that use the
      condition. Low-noise rows are excluded because there the noised target identifies itself
      (measured on a prototype: InfoNCE weighted toward low noise did nothing).
      ``lambda = train.lambda_x0`` (default 0.3): the MSE per row in standardised units is O(1)
      while the InfoNCE starts at log(B) ~ 6.2 for B = 512 negatives, so a weight well below 1 keeps the
      contrastive term a regulariser of the same order as the MSE instead of letting it dominate the denoiser.

    Gradients: targets and conditions of the diffusion terms are detached, so the heads learn
    from the first InfoNCE only and the denoisers cannot move the space they are modelling.
    """
    a, b = model.config.modalities
    h = {m: model.project(m, batch[m]) for m in (a, b)}  # (B, D) unit norm
    loss_clip = info_nce(h[a], h[b], model.heads.scale())
    if update_stats:
        for m in (a, b):
            model.update_stats(m, h[m].detach())
        model.stats_updates += 1
    loss_diff, parts = denoiser_loss(model, {m: h[m].detach() for m in (a, b)}, generator)
    total = loss_clip + loss_diff
    parts = {"clip": float(loss_clip.detach()), **parts}
    parts["total"] = float(total.detach())
    return total, parts


def denoiser_loss(
    model: DiffGAP, h: dict[str, torch.Tensor], generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, float]]:
    """The diffusion terms of :func:`diffgap_loss` for both directions, given detached head-space
    embeddings ``h[m]: (B, D)`` (unit norm) of a batch of pairs: the second stage of two-stage
    training calls it on precomputed embeddings of the frozen heads."""
    cfg = model.config
    tcfg = cfg.train
    T = model.schedule.T
    a, b = cfg.modalities
    nd = min(tcfg.denoiser_batch_size, h[a].shape[0])
    z = {m: model.standardize(m, h[m][:nd]) for m in (a, b)}  # (Bd, D)
    parts: dict[str, float] = {}
    total = torch.zeros(())
    t_start = timestep_start(T, cfg.diffusion.bridge_t0)
    nce_scale = model.heads.scale().detach()
    for direction in cfg.directions:
        target, source = parse_direction(direction)
        x0, cond = z[target], z[source]
        B = x0.shape[0]
        t = sample_timesteps(B, T, tcfg, t_start, generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        keep = (torch.rand(B, generator=generator) >= cfg.denoiser.cond_dropout).to(x0.device)
        x_t = model.schedule.q_sample(x0, t, noise)
        out, x0_hat = model.predict_x0(direction, x_t, t, cond, keep=keep)
        loss_diff = F.mse_loss(out, model.schedule.target(x0, noise, t))
        total = total + loss_diff
        parts[f"diff_{direction}"] = float(loss_diff.detach())
        rows = (t > int(tcfg.x0_infonce_min_t * T)) & keep
        if tcfg.lambda_x0 > 0 and int(rows.sum()) > 1:
            h0 = F.normalize(model.unstandardize(target, x0_hat[rows]), dim=-1)  # (M, D)
            logits = nce_scale * h0 @ h[target].T                              # (M, B): all B rows are negatives
            loss_x0 = F.cross_entropy(logits, torch.nonzero(rows).squeeze(1))
            total = total + tcfg.lambda_x0 * loss_x0
            parts[f"x0nce_{direction}"] = float(loss_x0.detach())
    return total, parts


# ---- optimisation helpers -------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, the temperature and the null condition (1-d tensors).

    ``fused=True``: torch's fused AdamW kernel, the same update in one pass over the parameters
    (CPU and CUDA). A clap-512 denoiser step with the per-tensor loop torch uses by default on CPU
    (and a per-parameter EMA loop) measured 103 ms median against 90.6 ms with this optimiser and
    :func:`ema_update`, on 2 threads (``python -m benchmarks --only train-step``,
    ``benchmarks/results/vm-20261203-180423.md``)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.999), fused=True,
    )


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, all parameters in one multi-tensor op; buffers copied."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


# ---- distributed ----------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join a gloo process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def _allreduce_mean(tensors: list[torch.Tensor], world: int) -> None:
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    off = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[off:off + n].view_as(t))
        off += n


# ---- the loop -------------------------------------------------------------------------------
@dataclass
class TrainResult:
    model: DiffGAP                 # EMA weights, eval mode
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    checkpoint: Path | None = None


def train(
    cfg: DiffGAPConfig,
    data: Pairs,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log_every: int = 50,
    save_every: int = 0,
    dist_info: Dist | None = None,
    extra_meta: dict[str, Any] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``cfg`` on ``data`` (paired embeddings); write a checkpoint to ``out`` (rank 0).

    ``resume=True`` continues from the train state in ``out`` (weights, EMA, optimiser, RNG, step);
    ``stop_after=N`` ends this invocation after N steps with a resumable checkpoint (preemptible
    jobs), and a resumed run is bit-identical to an uninterrupted one. Returns the EMA model.
    Deterministic for a fixed ``cfg.train.seed``, world size and thread count.
    """
    from diffgap.core.progress import progress_bar

    tcfg = cfg.train
    dist_info = dist_info or init_distributed()
    a, b = cfg.modalities
    for m in (a, b):
        if m not in data.embeddings:
            raise ValueError(f"training data {data.path} has no {m!r} embeddings; preset {cfg.name!r} needs {cfg.modalities}")
    have = {m: data.dims[m] for m in cfg.modalities}
    if have != cfg.input_dims:
        raise ValueError(f"training data {data.path} has embedding widths {have}, the config expects {cfg.input_dims}; "
                        "build the config with cfg.with_input_dims(data.dims) (what `diffgap train` does)")
    if len(data) < tcfg.batch_size:
        raise ValueError(f"training data {data.path} has {len(data)} pairs, fewer than batch size {tcfg.batch_size}; lower --batch-size")

    torch.manual_seed(tcfg.seed)  # identical initial weights on every rank
    model = DiffGAP(cfg)
    ema = copy.deepcopy(model)
    opt = make_optimizer(model, tcfg)
    start = 0
    rng_state = None
    if resume:
        if out is None or not (Path(out) / "config.json").exists():
            raise FileNotFoundError(f"--resume needs an existing checkpoint in {out}; drop --resume to start fresh")
        ema_loaded, meta = load_checkpoint(out)
        st = load_train_state(out)
        if st is None:
            raise ValueError(f"checkpoint {out} has no training state (saved without it); cannot resume, start fresh")
        if ema_loaded.config.to_dict() | {"train": {}} != cfg.to_dict() | {"train": {}}:
            raise ValueError(f"checkpoint {out} was trained with a different model config; resume with preset {ema_loaded.config.name!r}")
        ema.load_state_dict(ema_loaded.state_dict())
        model.load_state_dict(st["live_model"])
        if st["optimizer"] is not None:
            opt.load_state_dict(st["optimizer"])
        start = int(st["json"]["step"])
        rng_state = st["tensors"].get(f"rng.{dist_info.rank}")
        log.info("resuming %s from step %d", out, start)
    if dist_info.world > 1:
        _allreduce_mean([p.data for p in model.parameters()], dist_info.world)  # already equal; guards drift

    gen = torch.Generator().manual_seed(tcfg.seed * 1000003 + dist_info.rank * 7919)
    if rng_state is not None:  # resumed runs continue the exact batch/noise stream
        gen.set_state(rng_state)
    X = {m: torch.from_numpy(data[m]) for m in (a, b)}
    n = len(data)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    model.train()
    end = tcfg.steps if stop_after is None else min(tcfg.steps, start + stop_after)
    bar = progress_bar(range(start, end), initial=start, total=tcfg.steps, disable=not (progress and dist_info.main),
                      desc=f"train {cfg.name}", dynamic_ncols=True)
    running: dict[str, float] = {}
    for step in bar:
        lr = lr_at(step, tcfg)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (tcfg.batch_size,), generator=gen)
        batch = {m: X[m][idx] for m in (a, b)}
        loss, parts = diffgap_loss(model, batch, gen)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        if dist_info.world > 1:
            _allreduce_mean([p.grad for p in model.parameters()], dist_info.world)
            _allreduce_mean([buf for name, buf in model.named_buffers() if name.startswith("stats_") and buf.is_floating_point()], dist_info.world)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        # EMA warm-up (as in timm / DiT): short runs use a smaller effective decay at first.
        ema_update(ema, model, min(tcfg.ema_decay, (1.0 + step) / (10.0 + step)))
        for k, v in parts.items():
            running[k] = 0.9 * running.get(k, v) + 0.1 * v
        if (step + 1) % log_every == 0 or step + 1 == end:
            rec = {"step": step + 1, "lr": lr, "grad_norm": float(gnorm), **parts}
            history.append(rec)
            bar.set_postfix(loss=f"{running['total']:.3f}", clip=f"{running['clip']:.3f}")
            log.debug("step %d %s", step + 1, rec)
        if save_every and out is not None and dist_info.main and (step + 1) % save_every == 0 and step + 1 < tcfg.steps:
            _save(out, model, ema, opt, step + 1, history, time.perf_counter() - t0, extra_meta, gen, dist_info)
    bar.close()
    seconds = time.perf_counter() - t0
    meta = dict(extra_meta or {})
    meta["world_size"] = dist_info.world
    if dist_info.world > 1:
        meta["ranks_in_sync"] = _ranks_in_sync(model, dist_info.world)
    ckpt = None
    if out is not None and dist_info.main:
        ckpt = _save(out, model, ema, opt, end, history, seconds, meta, gen, dist_info)
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()
    ema.eval()
    return TrainResult(ema, end, history, seconds, ckpt)


def _ranks_in_sync(model: torch.nn.Module, world: int) -> bool:
    """True if every rank holds bit-identical weights (gradient averaging kept them in lock-step)."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def _save(out, model, ema, opt, step, history, seconds, extra_meta, gen, dist_info) -> Path:
    meta = {
        "step": step,
        "train_seconds": round(seconds, 2),
        "final_losses": history[-1] if history else {},
        "parameters": ema.parameter_counts(),
        **(extra_meta or {}),
    }
    # Only rank 0 saves; its generator state is stored (other ranks re-derive theirs on resume).
    state = {"live_model": model.state_dict(), "optimizer": opt.state_dict(), "json": {"step": step},
             "tensors": {f"rng.{dist_info.rank}": gen.get_state()}}
    return save_checkpoint(out, ema, meta, train_state=state, overwrite=True)
