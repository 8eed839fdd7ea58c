"""TensorRT engine builder and engine cache (TensorRT 10.12+ / 11, tensorrt + pycuda, no torch).

Layout of the engine cache (default ``EXPORT_DIR/engines``)::

    engines/
      <host slug>/                         # one folder per (GPU name, compute capability, TensorRT version)
        timing.cache                       # persistent builder timing cache of that host
        <model>.<precision>.plan           # the serialized engine (raw: Triton's tensorrt_plan loads it as is)
        <model>.<precision>.plan.json      # EngineMeta: cache key, I/O declaration, sha256 of the plan

An engine's cache key is the sha256 of the ONNX it was built from, the TensorRT version, the GPU
name and compute capability (plus the build settings: profile and optimisation level). The host
triple selects the folder, so engines for several GPUs can share one export directory; the sidecar
holds the full key. ``build_engines`` reuses an engine whose key matches, rebuilds one whose key
does not (a changed export, another TensorRT, other settings), or — with ``rebuild=False`` — refuses
with a message naming the mismatch. Sessions check the same key before deserialising.

Precision: the network is **strongly typed** (TensorRT 11 has no FP16 builder flag; precision is
whatever the ONNX says), so the fp16 engine is built from ``<model>.fp16.onnx`` and the fp32 engine
from ``<model>.onnx``. TensorRT 10.12+ needs the explicit ``STRONGLY_TYPED`` creation flag;
TensorRT 11 is always strongly typed and ignores it (TensorRT 11 migration guide).

Each sidecar records the TensorRT version that built the engine (``trt_version``; also part of the
key), which ``diffgap triton-repo --flavor gpu`` compares with the serving tritonserver's TensorRT.
Versions, lazy imports, GPU identity and the current device live in :mod:`diffgap.runtime.trt_host`
(re-exported here). Everything that needs a GPU is imported lazily; the cache-key, sidecar and
version logic is pure python and unit-tested on CPU.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from diffgap.core.errors import UserError
from diffgap.core.fsutil import atomic_write_bytes, atomic_write_json, read_versioned_json, sha256_file
from diffgap.core.iospec import IOSpec
from diffgap.core.manifest import Manifest

from .trt_host import (  # noqa: F401  (re-exported: the engine API's public names)
    MIN_TRT, HostInfo, check_device_index, check_server_trt, check_trt_version, device_context, import_pycuda,
    import_tensorrt, needs_strongly_typed_flag, network_flags, parse_version, trt_logger, trt_release,
)

log = logging.getLogger(__name__)

ENGINE_FORMAT = "diffgap-engine/1"
ENGINE_DIRNAME = "engines"
TIMING_CACHE = "timing.cache"
DEFAULT_OPT_LEVEL = 3       # TensorRT's own default builder_optimization_level
OPT_LEVELS = range(0, 6)    # IBuilderConfig.builder_optimization_level accepts 0..5


@dataclass(frozen=True)
class BuildSettings:
    opt_level: int = DEFAULT_OPT_LEVEL
    workspace_mib: int | None = None  # builder workspace pool limit; None = TensorRT's default (device memory)

    def __post_init__(self) -> None:
        if self.opt_level not in OPT_LEVELS:
            raise UserError(f"builder optimisation level must be in 0..5, got {self.opt_level}")
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise UserError(f"workspace must be >= 1 MiB, got {self.workspace_mib}")


def cache_key(onnx_sha256: str, host: HostInfo, io: IOSpec, precision: str, settings: BuildSettings) -> dict[str, Any]:
    """Everything an engine depends on; two engines with equal keys are interchangeable."""
    return {
        "onnx_sha256": onnx_sha256,
        "trt_version": host.trt_version,
        "gpu_name": host.gpu_name,
        "compute_capability": host.compute_capability,
        "precision": precision,
        "profile": [io.min_batch, io.opt_batch, io.max_batch],
        "opt_level": settings.opt_level,
        "workspace_mib": settings.workspace_mib,
    }


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def key_mismatch(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Human-readable differences ``"trt_version: 10.12.0 -> 10.13.0"``."""
    return [f"{k}: {have.get(k)!r} -> {want.get(k)!r}" for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]


# ----------------------------------------------------------------------------------------------
# the sidecar
# ----------------------------------------------------------------------------------------------
@dataclass
class EngineMeta:
    """``<model>.<precision>.plan.json``: the key an engine was built under and its I/O declaration."""

    model: str
    precision: str
    onnx_file: str
    key: dict[str, Any]
    io: IOSpec
    engine_sha256: str = ""
    engine_bytes: int = 0
    build_seconds: float = 0.0
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def sidecar(plan: str | Path) -> Path:
        plan = Path(plan)
        return plan.with_name(plan.name + ".json")

    @property
    def host(self) -> HostInfo:
        return HostInfo(self.key["trt_version"], self.key["gpu_name"], self.key["compute_capability"])

    @property
    def trt_version(self) -> str:
        """The TensorRT release that built the engine: the only one that can deserialise it."""
        return str(self.key["trt_version"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ENGINE_FORMAT, "model": self.model, "precision": self.precision, "onnx_file": self.onnx_file,
            "trt_version": self.trt_version,
            "key": self.key, "key_digest": key_digest(self.key), "io": self.io.to_dict(),
            "engine_sha256": self.engine_sha256, "engine_bytes": self.engine_bytes,
            "build_seconds": self.build_seconds, "created": self.created, "extra": self.extra,
        }

    def write(self, plan: str | Path) -> Path:
        out = self.sidecar(plan)
        atomic_write_json(out, self.to_dict())
        return out

    @classmethod
    def read(cls, plan: str | Path) -> "EngineMeta":
        p = cls.sidecar(plan)
        if not p.exists():
            raise FileNotFoundError(f"engine metadata {p} not found; rebuild with `diffgap build-engines`")
        d = read_versioned_json(p, ENGINE_FORMAT, "engine metadata", "rebuild with `diffgap build-engines`")
        try:
            return cls(
                model=d["model"], precision=d["precision"], onnx_file=d["onnx_file"], key=dict(d["key"]),
                io=IOSpec.from_dict(d["io"]), engine_sha256=d.get("engine_sha256", ""),
                engine_bytes=int(d.get("engine_bytes", 0)), build_seconds=float(d.get("build_seconds", 0.0)),
                created=d.get("created", ""), extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError) as e:
            raise UserError(f"engine metadata {p} is malformed ({e!r}); rebuild with `diffgap build-engines`") from e

    def check_file(self, plan: str | Path) -> None:
        """The plan on disk is the one this sidecar describes (catches truncation and replacement)."""
        plan = Path(plan)
        if not plan.is_file():
            raise FileNotFoundError(f"TensorRT engine {plan} not found; build it with `diffgap build-engines`")
        if plan.stat().st_size != self.engine_bytes or sha256_file(plan) != self.engine_sha256:
            raise UserError(f"{plan} does not match the sha256 in {self.sidecar(plan).name} (truncated or replaced); rebuild with `diffgap build-engines`")

    def check_host(self, host: HostInfo, plan: str | Path = "") -> None:
        if self.host != host:
            raise UserError(
                f"engine {plan or self.model} was built for {self.host.describe()} but this host is "
                f"{host.describe()}; TensorRT engines are not portable: run `diffgap build-engines`"
            )


# ----------------------------------------------------------------------------------------------
# where engines live, and finding the right one
# ----------------------------------------------------------------------------------------------
def engine_root(man: Manifest, engine_dir: str | Path | None = None) -> Path:
    return Path(engine_dir) if engine_dir is not None else man.root / ENGINE_DIRNAME


def engine_path(root: str | Path, host: HostInfo, model: str, precision: str) -> Path:
    return Path(root) / host.slug / f"{model}.{precision}.plan"


def onnx_sha256(man: Manifest, model: str, precision: str) -> str:
    rel = man.model(model).file(precision)
    rec = man.files.get(rel)
    if rec is None:
        raise UserError(f"{rel} is not hashed in {man.root}/manifest.json; re-run `diffgap export`")
    return rec["sha256"]


def find_engine(
    man: Manifest,
    model: str,
    precision: str = "fp16",
    engine_dir: str | Path | None = None,
    host: HostInfo | None = None,
    device: int = 0,
) -> Path:
    """The engine for ``model`` built for CUDA device ``device`` of this host from the current export,
    or a clear error. ``host`` overrides the identity read from that device."""
    root = engine_root(man, engine_dir)
    host = host or HostInfo.current(check_device_index(device))
    plan = engine_path(root, host, model, precision)
    if not plan.is_file():
        others = sorted(root.glob(f"*/{model}.{precision}.plan")) if root.is_dir() else []
        hint = ""
        if others:
            built = []
            for o in others:
                try:
                    built.append(EngineMeta.read(o).host.describe())
                except (OSError, ValueError):
                    built.append(o.parent.name)
            hint = f" (engines exist for: {'; '.join(built)})"
        raise FileNotFoundError(
            f"no {precision} TensorRT engine for {model!r} built on {host.describe()} under {root}{hint}; "
            f"run `diffgap build-engines {man.root}`"
        )
    meta = EngineMeta.read(plan)
    meta.check_host(host, plan)
    want_sha = onnx_sha256(man, model, precision)
    if meta.key.get("onnx_sha256") != want_sha:
        raise UserError(f"engine {plan} was built from another version of {meta.onnx_file} (export changed); run `diffgap build-engines {man.root}`")
    return plan


@dataclass
class BuildDecision:
    model: str
    precision: str
    plan: Path
    action: str  # "reuse" | "build" | "rebuild" | "refuse"
    reason: str
    key: dict[str, Any]


def plan_builds(
    man: Manifest,
    host: HostInfo,
    models: Iterable[str] | None = None,
    precisions: Iterable[str] = ("fp16",),
    engine_dir: str | Path | None = None,
    settings: BuildSettings = BuildSettings(),
    rebuild: bool = True,
    force: bool = False,
) -> list[BuildDecision]:
    """Decide, without a GPU, what ``build_engines`` will do for each (model, precision)."""
    root = engine_root(man, engine_dir)
    names = list(models) if models is not None else sorted(man.models)
    out: list[BuildDecision] = []
    for name in names:
        entry = man.model(name)
        for prec in precisions:
            key = cache_key(onnx_sha256(man, name, prec), host, entry.io, prec, settings)
            plan = engine_path(root, host, name, prec)
            if not plan.exists():
                out.append(BuildDecision(name, prec, plan, "build", "no engine yet", key))
                continue
            try:
                meta = EngineMeta.read(plan)
                meta.check_file(plan)
                diff = key_mismatch(meta.key, key)
                reason = "; ".join(diff) if diff else ""
            except (OSError, ValueError) as e:
                diff, reason = ["unreadable"], str(e)
            if force:
                out.append(BuildDecision(name, prec, plan, "rebuild", "forced", key))
            elif not diff:
                out.append(BuildDecision(name, prec, plan, "reuse", "cache key matches", key))
            elif rebuild:
                out.append(BuildDecision(name, prec, plan, "rebuild", reason, key))
            else:
                out.append(BuildDecision(name, prec, plan, "refuse", reason, key))
    return out


# ----------------------------------------------------------------------------------------------
# building (GPU)
# ----------------------------------------------------------------------------------------------
def _load_timing_cache(trt: Any, config: Any, path: Path) -> Any:
    data = b""
    if path.exists():
        data = path.read_bytes()
    cache = config.create_timing_cache(data)
    if cache is None and data:
        log.warning("timing cache %s is unreadable by TensorRT %s; starting an empty one", path, trt.__version__)
        cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        raise RuntimeError(f"TensorRT could not use timing cache {path}; delete it and retry")
    return cache


def build_engine(
    onnx_path: str | Path,
    io: IOSpec,
    plan: str | Path,
    *,
    model: str,
    precision: str,
    key: dict[str, Any],
    settings: BuildSettings = BuildSettings(),
    timing_cache: str | Path | None = None,
) -> EngineMeta:
    """Parse one ONNX into a strongly typed network, build and write ``plan`` + its sidecar."""
    trt = import_tensorrt()
    logger = trt_logger()
    onnx_path, plan = Path(onnx_path), Path(plan)
    t0 = time.perf_counter()
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "unknown parser error"
        raise ValueError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors[:800]}")

    net_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    net_outputs = {network.get_output(i).name for i in range(network.num_outputs)}
    if net_inputs != set(io.input_names) or net_outputs != set(io.output_names):
        raise ValueError(
            f"{onnx_path}: network I/O {sorted(net_inputs)} -> {sorted(net_outputs)} differs from the declaration "
            f"{io.input_names} -> {io.output_names}; re-export"
        )

    config = builder.create_builder_config()
    config.builder_optimization_level = settings.opt_level
    if settings.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    profile = builder.create_optimization_profile()
    for t in io.inputs:
        lo, opt, hi = io.profile(t.name)
        profile.set_shape(t.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    if cache_path is not None:
        _load_timing_cache(trt, config, cache_path)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    data = bytes(memoryview(serialized))
    plan.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(plan, data)
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    meta = EngineMeta(
        model=model, precision=precision, onnx_file=onnx_path.name, key=key, io=io,
        engine_sha256=hashlib.sha256(data).hexdigest(), engine_bytes=len(data),
        build_seconds=round(time.perf_counter() - t0, 3), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    meta.write(plan)
    log.info("built %s (%d bytes, %.1f s)", plan, len(data), meta.build_seconds)
    return meta


def build_engines(
    export_dir: str | Path | Manifest,
    models: Iterable[str] | None = None,
    precisions: Iterable[str] = ("fp16",),
    engine_dir: str | Path | None = None,
    settings: BuildSettings = BuildSettings(),
    rebuild: bool = True,
    force: bool = False,
    device: int = 0,
) -> list[BuildDecision]:
    """Build (or reuse) the engines of an export directory on CUDA device ``device``; returns what was done.

    Device ``device`` is made current around the builds (TensorRT builds on the current device) and
    its name and compute capability key the cache. With ``rebuild=False`` an out-of-date engine
    raises :class:`~diffgap.core.errors.UserError` (a ``ValueError``) naming the mismatch and nothing is built.
    """
    check_device_index(device)
    man = export_dir if isinstance(export_dir, Manifest) else Manifest.load(export_dir, verify=True)
    host = HostInfo.current(device)
    decisions = plan_builds(man, host, models, precisions, engine_dir, settings, rebuild, force)
    refused = [d for d in decisions if d.action == "refuse"]
    if refused:
        lines = "; ".join(f"{d.model} {d.precision}: {d.reason}" for d in refused)
        raise UserError(f"out-of-date engines and rebuilding is off (--no-rebuild): {lines}; rerun without --no-rebuild")
    root = engine_root(man, engine_dir)
    timing = root / host.slug / TIMING_CACHE
    todo = [d for d in decisions if d.action != "reuse"]
    for d in decisions:
        if d.action == "reuse":
            log.info("reusing %s (%s)", d.plan, d.reason)
    if not todo:
        return decisions
    with device_context(device):
        for d in todo:
            log.info("%s %s %s on CUDA device %d: %s", d.action, d.model, d.precision, device, d.reason)
            build_engine(
                man.path(d.model, d.precision), man.model(d.model).io, d.plan, model=d.model, precision=d.precision,
                key=d.key, settings=settings, timing_cache=timing,
            )
    return decisions
