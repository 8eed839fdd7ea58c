"""Robustness check of the default recipe on CLAP-like benchmarks built differently from `diffgap synth`
(not collected by pytest; a script). Each benchmark has its own generator, then the default recipe runs
exactly as a user would run it:

    diffgap train --data train.npz --val val.npz --out ck      (no other flags)
    diffgap eval --checkpoint ck --data test.npz --val val.npz

and the script prints raw / heads / linear adapter / full R@1 both directions and full - linear adapter, then
the raw-space generative-prior table (the generator's condition: Frechet, k-NN precision/recall, cosine to
the partner, diversity, and whether the goal is met).

Usage: python tests/robustness_bench.py OUT_DIR [NAME ...]   (names: tanh, linear, relu-noisy)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from diffgap.core.data import save_pairs


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make(name: str, n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Three splits of paired (text, audio) 512-d unit embeddings from the named generator."""
    rng = np.random.default_rng(seed)
    E = 512
    mods = ("text", "audio")
    if name == "tanh":        # shared 48-factor subspace + a per-modality 2-layer tanh distortion, 24 private dims
        k, p, h = 48, 24, 192
        A = np.linalg.qr(rng.standard_normal((E, k)))[0]
        maps = {m: (rng.standard_normal((h, k)) / np.sqrt(k) * 1.5, rng.standard_normal((k, h)) / np.sqrt(h),
                    np.linalg.qr(rng.standard_normal((E, p)))[0], rng.standard_normal(E) * 0.5 / np.sqrt(E)) for m in mods}

        def emb(m, s, r):
            W1, W2, P, off = maps[m]
            inner = s / np.sqrt(k) + 1.0 * np.tanh(s @ W1.T) @ W2.T / np.sqrt(k) + 1.1 * r.standard_normal((len(s), k)) / np.sqrt(k)
            x = inner @ A.T + 0.4 * r.standard_normal((len(s), p)) @ P.T / np.sqrt(p) + off
            return _unit(x + 0.3 * r.standard_normal((len(s), E)) / np.sqrt(E))
    elif name == "linear":    # a per-modality random linear distortion of a shared subspace: the linear adapter's home ground
        k = 96
        A = np.linalg.qr(rng.standard_normal((E, k)))[0]
        R = {m: np.eye(k) + 0.8 * rng.standard_normal((k, k)) / np.sqrt(k) for m in mods}
        off = rng.standard_normal(E) / np.sqrt(E)

        def emb(m, s, r):
            x = (s @ R[m].T / np.sqrt(k) + 1.4 * r.standard_normal((len(s), k)) / np.sqrt(k)) @ A.T
            return _unit(x + (0.4 if m == "audio" else -0.4) * off + 0.3 * r.standard_normal((len(s), E)) / np.sqrt(E))
    elif name == "relu-noisy":  # ReLU features of 32 shared factors, large private subspace (128 dims), low SNR
        k, p, h = 32, 128, 96
        A = np.linalg.qr(rng.standard_normal((E, h)))[0]
        W1 = rng.standard_normal((h, k)) / np.sqrt(k)
        maps = {m: (W1 + 1.0 * rng.standard_normal((h, k)) / np.sqrt(k), np.linalg.qr(rng.standard_normal((E, p)))[0]) for m in mods}

        def emb(m, s, r):
            W, P = maps[m]
            f = (np.maximum(s @ W.T, 0) - 0.4 + 0.95 * r.standard_normal((len(s), h))) / np.sqrt(h)
            x = f @ A.T + 0.4 * r.standard_normal((len(s), p)) @ P.T / np.sqrt(p)
            return _unit(x + 0.3 * r.standard_normal((len(s), E)) / np.sqrt(E))
    else:
        raise SystemExit(f"unknown benchmark {name!r}")
    kdim = {"tanh": 48, "linear": 96, "relu-noisy": 32}[name]
    out = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        r = np.random.default_rng(rng.integers(1 << 31))
        s = r.standard_normal((n, kdim))
        out[split] = {m: emb(m, s, r) for m in ("text", "audio")}
    return out


def main() -> int:
    out = Path(sys.argv[1])
    names = sys.argv[2:] or ["tanh", "linear", "relu-noisy"]
    sizes = {"tanh": (20000, 1000, 1000), "linear": (12000, 1000, 2000), "relu-noisy": (16000, 800, 500)}
    py = sys.executable
    for name in names:
        i = ["tanh", "linear", "relu-noisy"].index(name)  # each benchmark's seed, whichever are run
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        for split, arrs in make(name, *sizes[name], seed=100 + i).items():
            save_pairs(d / f"{split}.npz", ids=[f"{split}-{j}" for j in range(len(arrs["text"]))], **arrs)
        env_cmd = [py, "-m", "diffgap.cli"]
        subprocess.run(env_cmd + ["train", "--data", str(d / "train.npz"), "--val", str(d / "val.npz"), "--out", str(d / "ck"),
                                  "--no-progress", "--threads", "1"], check=True)
        subprocess.run(env_cmd + ["eval", "--checkpoint", str(d / "ck"), "--data", str(d / "test.npz"), "--val", str(d / "val.npz"),
                                  "--json", str(d / "eval.json"), "--bootstrap", "500", "--threads", "1"],
                       check=True, stdout=subprocess.DEVNULL)
        res = json.loads((d / "eval.json").read_text())
        for task, tr in res["tasks"].items():
            r = tr["rows"]
            c = tr["contrasts"]["full - linear adapter"]
            print(f"{name:<11}{task:<13} raw {r['raw']['R@1']:5.1f}  heads {r['heads']['R@1']:5.1f}  linear adapter "
                  f"{r['linear adapter']['R@1']:5.1f}  regression bridge {r['regression bridge']['R@1']:5.1f}  full {r['full']['R@1']:5.1f}  "
                  f"full - linear adapter {c['delta_R@1']:+.1f} [{c['ci'][0]:+.1f}, {c['ci'][1]:+.1f}]", flush=True)
        if "raw_prior" in res:  # the raw-space generative-prior table (diffgap.generation_eval), as diffgap eval prints it
            from diffgap.generation_eval import format_raw_prior

            print(f"{name}: " + format_raw_prior(res["raw_prior"]).lstrip("\n"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
