"""The export directory's ``manifest.json``: the contract between export and runtime. Torch-free.

Layout (``format: diffgap-export/1``)::

    {
      "format": "diffgap-export/1",
      "package_version": "0.1.0",
      "preset": "clap-512",                 # DiffGAP preset of the source checkpoint
      "checkpoint_sha256": "...",
      "embed_dim": 512,                      # input width E (encoder outputs, sampler conditions)
      "embed_dims": {"text": 512, "audio": 512},  # E per modality (absent in older exports: embed_dim)
      "models": {
        "<model name>": {
          "io": {IOSpec.to_dict()},          # the one I/O declaration
          "files": {"fp32": "<name>.onnx", "fp16": "<name>.fp16.onnx"},
          "meta": {...}                      # K, schedule, bridge mode, tokenizer, ...
        }, ...
      },
      "assets": {"tokenizer": "bpe_simple_vocab_16e6.txt.gz", ...},
      "files": {"<relative path>": {"sha256": "...", "bytes": N}, ...}
    }
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .fsutil import atomic_write_json, read_versioned_json, sha256_file
from .iospec import IOSpec
from .names import MANIFEST

FORMAT = "diffgap-export/1"


@dataclass
class ModelEntry:
    io: IOSpec
    files: dict[str, str]
    meta: dict[str, Any] = field(default_factory=dict)

    def file(self, precision: str) -> str:
        if precision not in self.files:
            raise UserError(
                f"model {self.io.name!r} has no {precision} file (has {sorted(self.files)}); re-export it"
            )
        return self.files[precision]


@dataclass
class Manifest:
    root: Path
    preset: str
    embed_dim: int
    models: dict[str, ModelEntry]
    checkpoint_sha256: str = ""
    package_version: str = ""
    assets: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    embed_dims: dict[str, int] = field(default_factory=dict)   # {modality: E}; empty: embed_dim for every modality

    def input_dim(self, modality: str) -> int:
        """E of ``modality``: the width of its embeddings (its encoder's output, its sampler's condition)."""
        return int(self.embed_dims.get(modality, self.embed_dim))

    def model(self, name: str) -> ModelEntry:
        if name not in self.models:
            raise KeyError(f"export {self.root} has no model {name!r}; it has {sorted(self.models)}")
        return self.models[name]

    def path(self, name: str, precision: str = "fp32") -> Path:
        return self.root / self.model(name).file(precision)

    def asset(self, key: str) -> Path:
        if key not in self.assets:
            raise KeyError(f"export {self.root} has no asset {key!r}; it has {sorted(self.assets)}")
        return self.root / self.assets[key]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "package_version": self.package_version,
            "preset": self.preset,
            "checkpoint_sha256": self.checkpoint_sha256,
            "embed_dim": self.embed_dim,
            **({"embed_dims": dict(self.embed_dims)} if self.embed_dims else {}),
            "models": {
                k: {"io": m.io.to_dict(), "files": dict(m.files), "meta": dict(m.meta)}
                for k, m in self.models.items()
            },
            "assets": dict(self.assets),
            "files": self.files,
            **({"extra": self.extra} if self.extra else {}),
        }

    def hash_files(self) -> None:
        """Record sha256 + size of every model file and asset (call after all are written)."""
        rels = [f for m in self.models.values() for f in m.files.values()] + list(self.assets.values())
        self.files = {
            rel: {"sha256": sha256_file(self.root / rel), "bytes": (self.root / rel).stat().st_size}
            for rel in sorted(set(rels))
        }

    def save(self) -> Path:
        self.hash_files()
        out = self.root / MANIFEST
        atomic_write_json(out, self.to_dict())
        return out

    def verify(self) -> None:
        """Check every listed file exists with its recorded sha256 (truncated/foreign files fail)."""
        for rel, rec in self.files.items():
            p = self.root / rel
            if not p.exists():
                raise FileNotFoundError(f"export file {p} listed in {MANIFEST} is missing; re-run `diffgap export`")
            if sha256_file(p) != rec["sha256"]:
                raise UserError(f"export file {p} does not match its sha256 in {MANIFEST} (truncated or replaced); re-export")

    @classmethod
    def load(cls, root: str | Path, verify: bool = False) -> "Manifest":
        root = Path(root)
        mpath = root / MANIFEST
        if not mpath.exists():
            raise FileNotFoundError(f"{mpath} not found: {root} is not a diffgap export directory (make one with `diffgap export`)")
        d = read_versioned_json(mpath, FORMAT, "export manifest", "re-export with `diffgap export`")
        models = {
            k: ModelEntry(io=IOSpec.from_dict(m["io"]), files=dict(m["files"]), meta=dict(m.get("meta", {})))
            for k, m in d["models"].items()
        }
        man = cls(
            root=root, preset=d.get("preset", ""), embed_dim=int(d["embed_dim"]), models=models,
            checkpoint_sha256=d.get("checkpoint_sha256", ""), package_version=d.get("package_version", ""),
            assets=dict(d.get("assets", {})), files=dict(d.get("files", {})), extra=dict(d.get("extra", {})),
            embed_dims={str(m): int(e) for m, e in d.get("embed_dims", {}).items()},
        )
        if verify:
            man.verify()
        return man
