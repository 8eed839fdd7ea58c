"""The python-backend model of the generation repository's torch-free python steps.

A *template*, like :mod:`diffgap.triton_models.python_model` (whose roles -- ``tokenizer``, ``onnx``
-- it serves unchanged, by subclassing): the generation repository copies it to ``<model>/1/model.py``.
Its own role, ``condition_noise``, fans each caption out to its N samples:

- inputs (per request of B captions): the caption's text embedding ``condition`` (B, E), an optional
  ``seed`` (B, 1) (absent: caption b of the request gets ``default_seed + b``,
  :func:`diffgap.core.generation.caption_seeds`), an optional ``samples`` (B, 1) -- one N per request --, the sampler's optional
  inputs (``guidance_scale`` (B, 1));
- outputs (B x N rows, sample j of caption b at row b*N + j): the condition repeated, the sampler's
  noise (row j of ``default_rng(seed_b).standard_normal((N, D))``,
  :func:`diffgap.core.generation.generation_noise`), the optional inputs repeated (or their declared
  defaults), and ``latent_seed`` = :func:`diffgap.core.generation.latent_seed` (seed_b, j), the
  generator's per-waveform seed. The same rules as ``diffgap generate``.

Imports: numpy, ``triton_python_backend_utils`` and torch-free ``diffgap`` modules only.
"""
from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from diffgap.core.generation import caption_seeds, generation_noise, latent_seed
from diffgap.triton_models.python_model import (_CLIENT_ERRORS, _BadRequest, _input, _optional_feeds, _param, client_error,
                                                 server_error)
from diffgap.triton_models.python_model import TritonPythonModel as _Base


class TritonPythonModel(_Base):
    def _init_condition_noise(self) -> None:
        self.default_seed = int(_param(self.config, "default_seed"))
        self.seed_input = _param(self.config, "seed_input")
        self.samples_input = _param(self.config, "samples_input")
        self.default_samples = int(_param(self.config, "default_samples"))
        self.max_samples = int(_param(self.config, "max_samples"))
        self.max_rows = int(_param(self.config, "max_rows"))
        self.condition = _param(self.config, "condition")
        self.noise = self.io.input(_param(self.config, "noise"))
        self.latent_seed = _param(self.config, "latent_seed")
        self.optional = [t for t in self.io.inputs if t.optional]

    def _feeds_condition_noise(self, request) -> dict[str, np.ndarray]:
        cond = _input(request, self.condition)
        if cond is None:
            raise _BadRequest(f"missing input {self.condition!r}; send the caption embedding")
        if not np.isfinite(cond).all():
            raise _BadRequest(f"{self.condition} contains NaN/Inf; send finite values")
        b = len(cond)
        seed = _input(request, self.seed_input)
        if seed is None:  # as `diffgap generate` without --seed: caption b of the request gets default_seed + b
            seed = caption_seeds(self.default_seed, b).reshape(b, 1)
        if seed.shape != (b, 1):
            raise _BadRequest(f"{self.seed_input} must be ({b}, 1) int64, got {seed.shape}")
        if (seed < 0).any():
            raise _BadRequest(f"{self.seed_input} must be non-negative")
        samples = _input(request, self.samples_input)
        n = self.default_samples
        if samples is not None:
            if samples.shape != (b, 1) or len(np.unique(samples)) != 1:
                raise _BadRequest(f"{self.samples_input} must be ({b}, 1) holding one value for the whole request, got {samples.ravel().tolist()}")
            n = int(samples.ravel()[0])
        if not 1 <= n <= self.max_samples:
            raise _BadRequest(f"{self.samples_input} must be in [1, {self.max_samples}], got {n}")
        if b * n > self.max_rows:
            raise _BadRequest(f"{b} caption(s) x {n} samples = {b * n} rows exceeds this repository's {self.max_rows}; "
                              "send fewer captions or samples per request")
        feeds = {self.condition: cond, self.seed_input: seed.reshape(b), self.samples_input: np.array(n)}
        feeds.update(_optional_feeds(request, self.optional, b, self.condition))
        return feeds

    def _condition_noise(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cond, seeds, n = feeds[self.condition], feeds[self.seed_input], int(feeds[self.samples_input])
        b, d = len(cond), self.noise.feature_shape[0]
        out = {
            self.condition: np.repeat(cond, n, axis=0),                                   # (B*N, E), row b*N + j
            self.noise.name: generation_noise(seeds, b, n, d).reshape(self.noise.concrete(b * n)),
            self.latent_seed: np.array([[latent_seed(int(s), j)] for s in seeds for j in range(n)], dtype=np.int64),
        }
        for t in self.optional:
            x = feeds[t.name] if t.name in feeds else np.full(t.concrete(b), t.default, dtype=t.np_dtype)
            out[t.name] = np.repeat(x, n, axis=0)
        return out

    def execute(self, requests):
        if self.role != "condition_noise":
            return super().execute(requests)
        # Each request fans out to its own B x N rows: answered one by one, never concatenated.
        responses = []
        for req in requests:
            try:
                feeds = self._feeds_condition_noise(req)
            except _CLIENT_ERRORS as e:
                responses.append(pb_utils.InferenceResponse(error=client_error(self.name, e)))
                continue
            try:
                out = self._condition_noise(feeds)
            except Exception as e:  # noqa: BLE001 - a failure on a validated request is the server's
                responses.append(pb_utils.InferenceResponse(error=server_error(self.name, e)))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in out.items()]))
        return responses
