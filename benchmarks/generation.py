"""The ``generation`` group: what the bridge costs against one generation, same run, same machine.

Generator side: a UNet of AudioLDM-small size with random weights (timings do not depend on the
weight values), built from its published configuration:

* source: ``default_audioldm_config()`` in ``audioldm/utils.py`` of github.com/haoheliu/AudioLDM
  (commit 17b3384d637dd81e70e08a8188c3cc558e2ea4d1), the ``audioldm-s-full`` UNet:
  ``model_channels`` 128, ``channel_mult`` [1, 2, 3, 5], ``num_res_blocks`` 2,
  ``attention_resolutions`` [8, 4, 2], ``in/out_channels`` 8, ``extra_film_condition_dim`` 512,
  ``extra_film_use_concat`` true; first-stage ``ch_mult`` [1, 2, 4] (latent downsampling 4);
* mapped to diffusers' ``UNet2DConditionModel`` by ``create_unet_diffusers_config`` of diffusers'
  ``scripts/convert_original_audioldm_to_diffusers.py`` (the script that produced the
  ``cvssp/audioldm-s-full-v2`` folder; ``image_size`` 512): :data:`AUDIOLDM_S_UNET` below;
* the pipeline's shipped call defaults, read from ``AudioLDMPipeline.__call__``: 10 denoising steps,
  guidance 2.5 (> 1: every step runs the UNet on the conditional and unconditional rows, batch 2N),
  5.12 s of audio = a (8, 128, 16) latent; DDIM with the converted scheduler's betas.

Timed: the denoising loop (UNet + ``DDIMScheduler.step``, torch eager on CPU). The VAE decoder and
the vocoder come after it and are not timed, so the bridge's share below is an upper bound on its
share of a whole generation.

Bridge side: the fused raw-space generation sampler (``text_to_audio_condition_sampler``: the
``clap-512`` denoiser's K-step samples mapped back through its heads, as generation ships; K as shipped = :data:`diffgap.core.generation.GEN_STEPS`) for the same N samples, on ORT CPU
FP32 through ``diffgap.runtime`` and as the torch eager module; its text embedding is not counted
(the stock generator embeds the caption too).
"""
from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import numpy as np

from .harness import Row, TimingPolicy, run_row

log = logging.getLogger("benchmarks")

CONFIG_SOURCE = ("haoheliu/AudioLDM audioldm/utils.py default_audioldm_config (commit 17b3384d637dd81e70e08a8188c3cc558e2ea4d1), "
                 "mapped by diffusers scripts/convert_original_audioldm_to_diffusers.py create_unet_diffusers_config (image_size 512)")
# create_unet_diffusers_config on the audioldm-s-full UNet: block_out_channels = 128 x channel_mult;
# a level is a cross-attention block where its downsampling factor (1, 2, 4, 8) is in
# attention_resolutions; cross_attention_dim defaults to block_out_channels; the FiLM condition is
# the "simple_projection" class embedding, concatenated to the time embedding.
AUDIOLDM_S_UNET: dict[str, Any] = {
    "sample_size": 512 // 4,
    "in_channels": 8, "out_channels": 8,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (128, 256, 384, 640),
    "layers_per_block": 2,
    "cross_attention_dim": (128, 256, 384, 640),
    "class_embed_type": "simple_projection",
    "projection_class_embeddings_input_dim": 512,
    "class_embeddings_concat": True,
}
# The converted scheduler (same script): DDIM, scaled_linear betas from the original config.
AUDIOLDM_S_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0195, "beta_schedule": "scaled_linear",
                        "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}
LATENT_FREQ = 64 // 4          # 64 mel bins / the VAE's downsampling
VOCODER_HOP_S = 160 / 16000    # seconds per mel frame: the vocoder's hop (upsample_rates product 160) / 16 kHz
# --quick: the tiny test UNet's sizes, only to prove the group runs
QUICK_UNET: dict[str, Any] = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "block_out_channels": (32, 64), "layers_per_block": 2,
    "cross_attention_dim": (32, 64), "class_embed_type": "simple_projection", "projection_class_embeddings_input_dim": 512,
    "class_embeddings_concat": True,
}


def pipeline_defaults() -> dict[str, Any]:
    """AudioLDMPipeline's shipped call defaults (steps, guidance) and the default length of an AudioLDM-s folder."""
    from diffusers import AudioLDMPipeline

    p = inspect.signature(AudioLDMPipeline.__call__).parameters
    unet, vae_scale = AUDIOLDM_S_UNET, 4
    # the pipeline's default audio_length_in_s: sample_size * vae_scale_factor * vocoder upsample factor
    length_s = unet["sample_size"] * vae_scale * VOCODER_HOP_S
    return {"num_inference_steps": int(p["num_inference_steps"].default), "guidance_scale": float(p["guidance_scale"].default),
            "audio_length_in_s": round(length_s, 4), "latent": (unet["in_channels"], unet["sample_size"], LATENT_FREQ)}


def _unet(quick: bool):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    cfg = QUICK_UNET if quick else AUDIOLDM_S_UNET
    return UNet2DConditionModel(**cfg).eval(), cfg


def _loop_factory(unet, latent: tuple[int, ...], n: int, steps: int, guidance: float, threads: int):
    def factory():
        import torch
        from diffusers import DDIMScheduler

        torch.set_num_threads(threads)
        sched = DDIMScheduler(**AUDIOLDM_S_SCHEDULER)
        g = torch.Generator().manual_seed(0)
        cond = torch.nn.functional.normalize(torch.randn(n, 512, generator=g), dim=-1)
        labels = torch.cat([torch.nn.functional.normalize(torch.randn(n, 512, generator=g), dim=-1), cond]) if guidance > 1 else cond
        x0 = torch.randn(n, *latent, generator=g)

        def fn():
            sched.set_timesteps(steps)
            x = x0.clone()
            with torch.inference_mode():
                for t in sched.timesteps:
                    inp = torch.cat([x, x]) if guidance > 1 else x
                    eps = unet(inp, t, encoder_hidden_states=None, class_labels=labels).sample
                    if guidance > 1:
                        u, c = eps.chunk(2)
                        eps = u + guidance * (c - u)
                    x = sched.step(eps, t, x).prev_sample
            return x

        return fn

    return factory


def _unet_call_factory(unet, latent, n: int, guidance: float, threads: int):
    def factory():
        import torch

        torch.set_num_threads(threads)
        rows = 2 * n if guidance > 1 else n
        x, labels = torch.randn(rows, *latent), torch.randn(rows, 512)

        def fn():
            with torch.inference_mode():
                return unet(x, 500, encoder_hidden_states=None, class_labels=labels).sample

        return fn

    return factory


def _bridge(ctx: Any, preset: str, steps: int):
    """A random-weight ``preset`` model (square linear heads) and its fused generation sampler (FP32 ONNX)."""
    import torch

    from diffgap.config import get_preset
    from diffgap.export.generation import GenerationSampler
    from diffgap.export.onnx_export import export_module
    from diffgap.models import DiffGAP

    torch.manual_seed(0)
    model = DiffGAP(get_preset(preset)).eval()
    with torch.no_grad():  # fresh zero-initialised output layers would make the sampler trivial
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    sampler = GenerationSampler(model, steps=steps).eval()
    io = sampler.io_spec()
    path = ctx.work / "generation" / f"{io.name}.K{steps}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    export_module(sampler, io, path)
    return sampler, io, path


def run(ctx: Any) -> dict[str, Any]:
    import torch

    from diffgap.core.generation import GEN_GUIDANCE, GEN_STEPS

    defaults = pipeline_defaults()
    n = 1                                   # `diffgap generate -n` default: one waveform per caption
    steps = 2 if ctx.quick else defaults["num_inference_steps"]
    guidance = defaults["guidance_scale"]
    unet, cfg = _unet(ctx.quick)
    latent = (cfg["in_channels"], cfg["sample_size"], cfg["sample_size"] // 2) if ctx.quick else defaults["latent"]
    res: dict[str, Any] = {
        "quick": bool(ctx.quick),
        "config_source": "the tiny test UNet (--quick: proves the group runs; no figure to quote)" if ctx.quick else CONFIG_SOURCE, "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "unet_parameters": int(sum(p.numel() for p in unet.parameters())), "pipeline_defaults": defaults,
        "samples": n, "generator_steps": steps, "generator_guidance": guidance, "latent": list(latent),
        "bridge_steps": GEN_STEPS, "bridge_guidance": GEN_GUIDANCE, "threads": ctx.threads, "rows": [],
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "timed": "generator: denoising loop (UNet + DDIM step), VAE decoder and vocoder excluded; bridge: fused sampler only",
    }
    # A loop is steps x (one or two) UNet calls: seconds to minutes on a small CPU. Its own policy: the
    # UNet-call row warms the model up; then few loop repeats.
    slow = TimingPolicy(warmup=1, repeats=3, min_time_s=0.0, max_time_s=0.0)
    loop_policy = TimingPolicy(warmup=0, repeats=2 if not ctx.quick else 1, min_time_s=0.0, max_time_s=0.0)
    rows = [
        run_row(Row("generation", "generator-unet-call", "torch-eager", "fp32", 2 * n if guidance > 1 else n,
                    extra={"what": "one UNet call (conditional + unconditional rows)"}),
                _unet_call_factory(unet, latent, n, guidance, ctx.threads), slow),
        run_row(Row("generation", "generator-denoising-loop", "torch-eager", "fp32", n, steps=steps,
                    extra={"what": f"{steps} DDIM steps, guidance {guidance}"}),
                _loop_factory(unet, latent, n, steps, guidance, ctx.threads), loop_policy),
    ]
    preset = "clap-tiny-gen" if ctx.quick else "clap-512"   # generation maps clap-512's samples back through its heads
    try:
        sampler, io, path = _bridge(ctx, preset, GEN_STEPS)
    except Exception as e:  # recorded, like any failed row
        log.warning("generation bridge not exported: %s: %s", type(e).__name__, e)
        res["bridge_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    else:
        res["bridge_preset"] = preset

        def ort_factory():
            from diffgap.runtime.session import load

            sess = load(path, backend="ort-cpu", io=io)
            feeds = io.sample_inputs(n, seed=0, include_optional=False)
            return lambda: sess.infer(feeds)

        def eager_factory():
            torch.set_num_threads(ctx.threads)
            feeds = {k: torch.from_numpy(v) for k, v in io.sample_inputs(n, seed=0, include_optional=True).items()}

            def fn():
                with torch.inference_mode():
                    return sampler(*feeds.values())

            return fn

        rows.append(run_row(Row("generation", "bridge-sampler", "ort-cpu", "fp32", n, steps=GEN_STEPS), ort_factory, ctx.policy))
        rows.append(run_row(Row("generation", "bridge-sampler", "torch-eager", "fp32", n, steps=GEN_STEPS), eager_factory, ctx.policy))
    res["rows"] = [r.to_dict() for r in rows]
    res["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    res["summary"] = summary(res)
    return res


def summary(res: dict[str, Any]) -> dict[str, Any]:
    ok = {(r["name"], r["backend"]): r["stats"]["median_ms"] for r in res.get("rows", []) if r["status"] == "ok"}
    loop = ok.get(("generator-denoising-loop", "torch-eager"))
    out: dict[str, Any] = {"generator_loop_ms": loop}
    for backend in ("ort-cpu", "torch-eager"):
        b = ok.get(("bridge-sampler", backend))
        if b is not None and loop:
            out[backend] = {"bridge_ms": b, "share_of_generation": b / (b + loop), "generator_over_bridge": loop / b}
    return out


# ---- report ------------------------------------------------------------------------------------
def markdown(res: dict[str, Any] | None) -> list[str]:
    if not res:
        return []
    d = res["pipeline_defaults"]
    size = "tiny test UNet" if res.get("quick") else "AudioLDM-small-size UNet"
    length = "" if res.get("quick") else f" = {d['audio_length_in_s']} s of audio"
    out = ["## Bridge cost against one generation", "",
           f"Generator: {size} ({res['unet_parameters'] / 1e6:.1f} M parameters, random weights; config: "
           f"{res['config_source']}), {res['generator_steps']} DDIM steps, guidance {res['generator_guidance']} "
           f"(batch {2 * res['samples'] if res['generator_guidance'] > 1 else res['samples']} per UNet call), latent "
           f"{tuple(res['latent'])}{length}, torch eager CPU, {res['threads']} threads. "
           f"Bridge: the fused raw-space generation sampler ({res.get('bridge_preset', '?')}, K = {res['bridge_steps']}, "
           f"N = {res['samples']}). Timed: {res['timed']}. Load average {res['loadavg_start']} at start, "
           f"{res['loadavg_end']} at end.", ""]
    body = []
    for r in res["rows"]:
        med = f"{r['stats']['median_ms']:.4g}" if r["status"] == "ok" else r["status"]
        n = r["stats"]["n"] if r["status"] == "ok" else ""
        body.append([r["name"], r["backend"], str(r["batch"]), str(r["steps"] or ""), med, str(n)])
    out += ["| what | backend | rows | steps | median ms | calls |", "|---|---|---|---|---|---|"]
    out += ["| " + " | ".join(b) + " |" for b in body] + [""]
    s = res.get("summary", {})
    for backend in ("ort-cpu", "torch-eager"):
        if backend in s:
            v = s[backend]
            out.append(f"- bridge on {backend}: {v['bridge_ms']:.3g} ms = {100 * v['share_of_generation']:.2f}% of bridge + "
                       f"denoising loop; the loop takes {v['generator_over_bridge']:.0f}x the bridge")
    if res.get("bridge_error"):
        out.append(f"- bridge not measured: {res['bridge_error']}")
    out.append("")
    return out


def plot(res: dict[str, Any] | None, path) -> bool:
    s = (res or {}).get("summary", {})
    bars = [(f"bridge ({b})", s[b]["bridge_ms"]) for b in ("ort-cpu", "torch-eager") if b in s]
    if not bars or not s.get("generator_loop_ms"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .harness import save_png

    bars.append((f"generator loop ({res['generator_steps']} steps)", s["generator_loop_ms"]))
    fig, ax = plt.subplots(figsize=(7, 3))
    labels, vals = zip(*bars)
    ax.barh(labels, np.asarray(vals) / 1e3)
    ax.set_xscale("log")
    ax.set_xlabel("seconds per generation (median, log scale)")
    ax.set_title("DiffGAP bridge vs an AudioLDM-small-size denoising loop, same machine")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    save_png(fig, path)
    return True
