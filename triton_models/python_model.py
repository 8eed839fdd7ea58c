"""The python-backend model of every diffgap Triton model that runs in Python.

This file is a *template*: ``diffgap triton-repo`` copies it unchanged to ``<model>/1/model.py`` and
the model's ``config.pbtxt`` names its role in ``parameters { key: "diffgap_role" ... }``:

- ``onnx``      an exported graph (encoder or fused sampler) on onnxruntime CPU through
                :func:`diffgap.runtime.session.load` (the portable flavour's stand-in for
                ``onnxruntime_onnx``); files ``model.onnx`` + ``io.json`` (its IOSpec);
- ``tokenizer`` ``TYPE_STRING`` captions -> the text encoder's token feeds, with the tokenizer the
                encoder declares (``io.json`` is the text encoder's IOSpec; the vocab asset sits here);
- ``noise``     the sampler's initial noise from an optional per-row seed (fixed default), row b from
                :func:`diffgap.runtime.make_noise` exactly as the in-process Pipeline makes it, plus
                the sampler's optional inputs filled with their declared defaults (a TensorRT plan
                needs every input bound); ``io.json`` is the sampler's IOSpec;
- ``search``    top-k ids and fused scores of a bridged query from the gallery index directory shipped
                in ``index/``, through its search engine (:class:`diffgap.runtime.search.GallerySearcher`,
                the code ``AudioSearch`` runs; a ``milvus`` index may be pointed at a server by the
                ``milvus_uri`` parameter).

Dynamic batching hands ``execute`` several requests at once: each request is validated on its own
(a bad one gets its own error response, the others still run), the good ones are concatenated
along the batch axis, run once, and split back.

Error classes: a request that fails validation (``_BadRequest`` from the role's checks, ``ValueError``
from :meth:`IOSpec.check_feeds`, a missing tensor) is a client mistake and is answered
``TritonError.INVALID_ARG`` -- HTTP 400 / gRPC ``INVALID_ARGUMENT`` -- with its one-line message, so
monitoring does not count it as a server fault and clients do not retry it. A failure while running
a validated batch is the server's and stays ``INTERNAL`` (HTTP 500 / gRPC ``INTERNAL``).

Imports: numpy, ``triton_python_backend_utils`` and torch-free ``diffgap`` modules only (the same
repository runs on a lean Triton image with ``pip install diffgap[runtime]``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from diffgap.core.iospec import IOSpec
from diffgap.runtime import make_noise
from diffgap.runtime.session import load


def _param(config: dict, key: str, default: str | None = None) -> str:
    p = config.get("parameters", {}).get(key)
    if p is None:
        if default is None:
            raise pb_utils.TritonModelException(f"config.pbtxt of {config.get('name')} lacks parameter {key!r}; regenerate the repository")
        return default
    return p["string_value"]


def _input(request, name: str) -> np.ndarray | None:
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


class _BadRequest(ValueError):
    """A client mistake found while validating one request (answered INVALID_ARG)."""


def _optional_feeds(request, optional, b: int, condition: str) -> dict[str, np.ndarray]:
    """The optional inputs ``request`` carries, checked for a batch of ``b`` rows of ``condition``.

    Triton has checked dtype and feature dims against config.pbtxt; batch and values remain.
    """
    feeds = {}
    for t in optional:
        x = _input(request, t.name)
        if x is not None:
            if x.shape != t.concrete(b):
                raise _BadRequest(f"{t.name} must be {list(t.concrete(b))} to match {condition}, got {list(x.shape)}")
            if x.dtype.kind == "f" and not np.isfinite(x).all():
                raise _BadRequest(f"{t.name} contains NaN/Inf; send finite values")
            feeds[t.name] = x
    return feeds


# Raised while validating a request's tensors: the request is at fault, not the server.
_CLIENT_ERRORS = (_BadRequest, ValueError, KeyError)


def client_error(model: str, e: BaseException):
    """``TritonError`` with code INVALID_ARG (HTTP 400 / gRPC INVALID_ARGUMENT) and a one-line message."""
    msg = str(e)
    if not msg.startswith(f"{model}:"):  # IOSpec messages already start with the model name
        msg = f"{model}: {msg}"
    return pb_utils.TritonError(_one_line(msg), pb_utils.TritonError.INVALID_ARG)


def server_error(model: str, e: BaseException):
    """``TritonError`` with code INTERNAL (HTTP 500 / gRPC INTERNAL): the server failed a valid request."""
    return pb_utils.TritonError(_one_line(f"{model}: {type(e).__name__}: {e}"), pb_utils.TritonError.INTERNAL)


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.config = json.loads(args["model_config"])
        self.name = self.config["name"]
        self.dir = Path(args["model_repository"]) / args["model_version"]
        self.role = _param(self.config, "diffgap_role")
        self.io = IOSpec.from_dict(json.loads((self.dir / "io.json").read_text()))
        self.max_batch = int(self.config.get("max_batch_size", 0))
        init = getattr(self, f"_init_{self.role}", None)
        if init is None:
            raise pb_utils.TritonModelException(f"{self.name}: unknown diffgap_role {self.role!r}; regenerate the repository")
        init()

    # -- roles: setup ----------------------------------------------------------------------
    def _init_onnx(self) -> None:
        threads = int(_param(self.config, "intra_op_threads", "0"))  # 0: onnxruntime's default, one per core
        # The ensemble's models take turns on the same cores: idle ORT pools sleep instead of spinning.
        self.session = load(self.dir / "model.onnx", backend="ort-cpu", io=self.io,
                            intra_op_threads=threads or None, spin_wait=False)

    def _init_tokenizer(self) -> None:
        from diffgap.core.tokenizer import load_tokenizer

        kind = _param(self.config, "tokenizer")
        asset = self.dir / _param(self.config, "tokenizer_asset")
        self.tokenizer = load_tokenizer(kind, asset.parent if kind == "roberta" and asset.is_file() else asset)
        self.text_input = _param(self.config, "text_input")
        self.max_text_bytes = int(_param(self.config, "max_text_bytes"))

    def _init_noise(self) -> None:
        self.default_seed = int(_param(self.config, "default_seed"))
        self.seed_input = _param(self.config, "seed_input")
        self.condition = _param(self.config, "condition")
        self.noise = self.io.input(_param(self.config, "noise"))
        self.optional = [t for t in self.io.inputs if t.optional]

    def _init_search(self) -> None:
        from diffgap.runtime import SEARCH_KNOBS, GalleryIndex, GallerySearcher

        spec = json.loads((self.dir / "search.json").read_text())
        self.k = int(spec["k"])
        self.tensors = spec["tensors"]  # role -> tensor name (clap, projected, bridged, ids, scores)
        uri = _param(self.config, "milvus_uri", "")
        self.knobs = {k: int(v) for k in SEARCH_KNOBS if (v := _param(self.config, k, ""))}
        weights = {k: float(v) for k, v in spec["weights"].items()}
        self.searcher = GallerySearcher(GalleryIndex.load(self.dir / "index"), "audio", weights, **({"uri": uri} if uri else {}))

    # -- execution -------------------------------------------------------------------------
    def execute(self, requests):
        responses: list = [None] * len(requests)
        good: list[tuple[int, dict[str, np.ndarray]]] = []
        for i, req in enumerate(requests):
            try:
                good.append((i, getattr(self, f"_feeds_{self.role}")(req)))
            except _CLIENT_ERRORS as e:
                responses[i] = pb_utils.InferenceResponse(error=client_error(self.name, e))
            except Exception as e:  # noqa: BLE001 - a bug in validation is the server's fault, not the client's
                responses[i] = pb_utils.InferenceResponse(error=server_error(self.name, e))
        if good:
            sizes = [len(next(iter(f.values()))) for _, f in good]
            try:
                outs = self._run_batch([f for _, f in good])
            except Exception as e:  # noqa: BLE001 - every request of the batch gets the error, none is lost
                err = server_error(self.name, e)
                for i, _ in good:
                    responses[i] = pb_utils.InferenceResponse(error=err)
                return responses
            start = 0
            for (i, _), n in zip(good, sizes):
                tensors = [pb_utils.Tensor(k, np.ascontiguousarray(v[start:start + n])) for k, v in outs.items()]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += n
        return responses

    def _run_batch(self, feeds_list: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        if self.role == "noise":  # per-request work only: concatenating changes nothing
            parts = [self._noise(f) for f in feeds_list]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        keys = feeds_list[0].keys()
        feeds = {k: np.concatenate([f[k] for f in feeds_list]) for k in keys}
        return getattr(self, f"_run_{self.role}")(feeds)

    # onnx ---------------------------------------------------------------------------------
    def _feeds_onnx(self, request) -> dict[str, np.ndarray]:
        feeds = {}
        for t in self.io.inputs:
            x = _input(request, t.name)
            if x is not None:
                feeds[t.name] = x
        self.io.check_feeds(feeds)  # dtype/shape/NaN/Inf per request, before batching with others
        for t in self.io.inputs:
            x = feeds.get(t.name)
            # Integer inputs with a declared range (token ids in [0, vocab)): onnxruntime's Gather would
            # wrap a negative id silently and fail on one past the vocabulary.
            if x is not None and x.dtype.kind in "iu" and t.low is not None and t.high is not None and x.size:
                lo, hi = int(x.min()), int(x.max())
                if lo < t.low or hi >= t.high:
                    bad = lo if lo < t.low else hi
                    raise _BadRequest(f"input {t.name!r} holds {bad}, outside its declared range [{int(t.low)}, {int(t.high)}) "
                                      f"(negative or past the vocabulary); send values in range")
        if any(t.optional and t.name not in feeds for t in self.io.inputs):
            # Fill optional defaults here so requests with and without them can share one batch.
            b = len(next(iter(feeds.values())))
            for t in self.io.inputs:
                if t.optional and t.name not in feeds:
                    feeds[t.name] = np.full(t.concrete(b), t.default, dtype=t.np_dtype)
        return feeds

    def _run_onnx(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.session.infer(feeds)

    # tokenizer ----------------------------------------------------------------------------
    def _feeds_tokenizer(self, request) -> dict[str, np.ndarray]:
        raw = _input(request, self.text_input)  # (B, 1) object array of bytes
        texts = []
        for row in raw.reshape(len(raw), -1):
            if row.shape[0] != 1:
                raise _BadRequest(f"{self.text_input} must be (B, 1) strings, got {raw.shape}")
            b = row[0]
            if not isinstance(b, (bytes, np.bytes_)):
                raise _BadRequest(f"{self.text_input} must hold UTF-8 bytes, got {type(b).__name__}")
            if len(b) > self.max_text_bytes:
                raise _BadRequest(
                    f"caption of {len(b)} bytes exceeds the limit of {self.max_text_bytes}; "
                    f"CLAP reads only {self.io.inputs[0].feature_shape[0]} tokens, send a shorter caption"
                )
            try:
                text = bytes(b).decode("utf-8")
            except UnicodeDecodeError as e:
                raise _BadRequest(f"caption is not valid UTF-8 ({e}); send UTF-8 text") from None
            if not text.strip():
                raise _BadRequest("empty caption; every query needs some text")
            texts.append(text)
        return {"texts": np.array(texts, dtype=object)}

    def _run_tokenizer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.tokenizer.feeds(list(feeds["texts"]), self.io)  # keyed by the encoder's declared roles

    # noise ----------------------------------------------------------------------------------
    def _feeds_noise(self, request) -> dict[str, np.ndarray]:
        cond = _input(request, self.condition)
        if cond is None:  # Triton counts inputs, not which: the optional ones can stand in for it
            raise _BadRequest(f"missing input {self.condition!r}; send the source embedding")
        if not np.isfinite(cond).all():
            raise _BadRequest(f"{self.condition} contains NaN/Inf; send finite values")
        feeds = {self.condition: cond}  # keyed by the config's tensor name (from the sampler's IOSpec role)
        seed = _input(request, self.seed_input)
        b = len(cond)
        if seed is not None:
            if seed.shape != (b, 1):
                raise _BadRequest(f"{self.seed_input} must be ({b}, 1) int64, got {seed.shape}")
            if (seed < 0).any():
                raise _BadRequest(f"{self.seed_input} must be non-negative")
            feeds[self.seed_input] = seed.reshape(b).astype(np.int64)
        feeds.update(_optional_feeds(request, self.optional, b, self.condition))
        return feeds

    def _noise(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        b = len(feeds[self.condition])
        seeds = feeds.get(self.seed_input, self.default_seed)
        out = {self.noise.name: make_noise(seeds, b, self.noise.feature_shape[0]).reshape(self.noise.concrete(b))}
        for t in self.optional:
            out[t.name] = feeds[t.name] if t.name in feeds else np.full(t.concrete(b), t.default, dtype=t.np_dtype)
        return out

    # search ---------------------------------------------------------------------------------
    def _feeds_search(self, request) -> dict[str, np.ndarray]:
        feeds = {}
        for role in ("clap", "projected", "bridged"):
            if role not in self.tensors:  # a term of weight 0 reads it: the ensemble does not compute it
                continue
            x = _input(request, self.tensors[role])
            if not np.isfinite(x).all():
                raise _BadRequest(f"{self.tensors[role]} contains NaN/Inf; clean the input")
            feeds[role] = x
        return feeds

    def _run_search(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from diffgap.runtime import BridgeResult

        q = BridgeResult(source=feeds.get("clap"), projected=feeds.get("projected"), bridged=feeds.get("bridged"))
        rows, best = self.searcher.search(q, self.k, **self.knobs)
        ids = np.asarray(self.searcher.side.ids[rows.ravel()]).reshape(rows.shape)
        return {self.tensors["ids"]: np.char.encode(ids.astype(str), "utf-8").astype(object), self.tensors["scores"]: best}

    def finalize(self) -> None:
        if getattr(self, "session", None) is not None:
            self.session.close()
        if getattr(self, "searcher", None) is not None:
            self.searcher.close()
