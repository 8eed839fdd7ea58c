"""The generator as a Triton python-backend model: condition rows -> waveforms (torch, diffusers).

A *file template*: the generation repository (:mod:`diffgap.triton_models.generation`) copies this
file unchanged to ``audio_generator/1/model.py``; Triton's python backend imports it at load time.

Why it lives here and not in ``diffgap.triton_models``: it needs torch and diffusers, and
``diffgap.triton_models`` is torch-free by an import-linter contract (a lean Triton image serves the
retrieval repository with ``pip install diffgap[runtime]``). This module is its own layer, with its
own contract in ``pyproject.toml``: it may use torch, diffusers and the generation code, never
training, evaluation, export or the CLI. The repository generator only reads its text.

The model follows the Triton Stable Diffusion example's pattern: ``initialize`` loads a local
diffusers pipeline folder named by the ``generator_dir`` parameter; ``execute`` takes the
conditions (the pipeline's ``prompt_embeds``) and returns waveforms. It runs the same function as
``diffgap generate`` (:func:`diffgap.generation_pipeline.run_generator`: one ``torch.Generator`` per
waveform, seeded by its ``latent_seed``; the generator's own empty-prompt embedding as the negative
condition under guidance), so a served waveform equals the in-process one.

Parameters (``config.pbtxt``): ``generator_dir``, ``device`` (``cpu`` / ``cuda``), and
``num_inference_steps`` / ``audio_length_in_s`` / ``guidance_scale`` (empty: the pipeline's
defaults); ``clap_fingerprint`` (the CLAP the bridge was trained on; checked at load unless
``any_clap`` is 1); the tensor names ``condition_input``, ``latent_seed_input``, ``waveform_output``.
"""
from __future__ import annotations

import inspect
import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from diffgap.encoders.hf_clap import HFClapEncoder
from diffgap.generation_pipeline import load_generator, run_generator
from diffgap.triton_models.python_model import _CLIENT_ERRORS, _BadRequest, _input, _param, client_error, server_error


def _optional(config: dict, key: str, cast):
    v = _param(config, key, "")
    return cast(v) if v != "" else None


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.config = json.loads(args["model_config"])
        self.name = self.config["name"]
        c = self.config
        self.condition = _param(c, "condition_input")
        self.latent_seed = _param(c, "latent_seed_input")
        self.waveform = _param(c, "waveform_output")
        self.steps = _optional(c, "num_inference_steps", int)
        self.length = _optional(c, "audio_length_in_s", float)
        folder = _param(c, "generator_dir")
        self.pipe = load_generator(folder, _param(c, "device", "cpu"))
        self.pipe.set_progress_bar_config(disable=True)
        enc = HFClapEncoder.from_pipeline(self.pipe, folder)
        trained = _param(c, "clap_fingerprint", "")
        if trained and _param(c, "any_clap", "0") != "1" and enc.fingerprint() != trained:
            raise pb_utils.TritonModelException(
                f"{self.name}: the generator in {folder} has CLAP {enc.fingerprint()[:12]} but the bridge was trained on "
                f"{trained[:12]}; point generator_dir at the generator whose CLAP the bridge was trained on"
            )
        self.embed_dim = enc.embed_dim
        g = _optional(c, "guidance_scale", float)
        self.guidance = float(inspect.signature(type(self.pipe).__call__).parameters["guidance_scale"].default if g is None else g)
        # The stock negative condition under guidance: the generator's own empty-prompt embedding.
        self.negative = enc.encode_text_tensor([""]).cpu().numpy() if self.guidance > 1.0 else None

    def _feeds(self, request) -> tuple[np.ndarray, np.ndarray]:
        cond = _input(request, self.condition)
        seeds = _input(request, self.latent_seed)
        if cond is None or seeds is None:
            raise _BadRequest(f"send both {self.condition!r} and {self.latent_seed!r}")
        if cond.ndim != 2 or cond.shape[1] != self.embed_dim:
            raise _BadRequest(f"{self.condition} must be (M, {self.embed_dim}), got {list(cond.shape)}")
        if not np.isfinite(cond).all():
            raise _BadRequest(f"{self.condition} contains NaN/Inf; send finite values")
        if seeds.shape != (len(cond), 1) or (seeds < 0).any():
            raise _BadRequest(f"{self.latent_seed} must be ({len(cond)}, 1) non-negative int64, got {list(seeds.shape)}")
        return cond.astype(np.float32, copy=False), seeds.reshape(-1)

    def execute(self, requests):
        responses: list = [None] * len(requests)
        good = []
        for i, req in enumerate(requests):
            try:
                good.append((i, *self._feeds(req)))
            except _CLIENT_ERRORS as e:
                responses[i] = pb_utils.InferenceResponse(error=client_error(self.name, e))
        if good:
            try:
                wav = run_generator(self.pipe, np.concatenate([c for _, c, _ in good]),
                                    [int(s) for _, _, ss in good for s in ss], self.negative,
                                    self.steps, self.length, self.guidance, progress=False)
            except Exception as e:  # noqa: BLE001 - every request of the batch gets the error
                err = server_error(self.name, e)
                for i, *_ in good:
                    responses[i] = pb_utils.InferenceResponse(error=err)
                return responses
            start = 0
            for i, c, _ in good:
                part = np.ascontiguousarray(wav[start:start + len(c)], dtype=np.float32)
                responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.waveform, part)])
                start += len(c)
        return responses

    def finalize(self) -> None:
        self.pipe = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
