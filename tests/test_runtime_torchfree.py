"""The whole ORT path runs in a process where torch cannot be imported.

A ``sitecustomize`` on ``PYTHONPATH`` puts a meta-path finder in front that raises
``ModuleNotFoundError`` for ``torch`` (what a lean install without torch raises). The child process
then runs every runtime module, both bridges, index building, text and audio search and the
``diffgap index`` / ``diffgap search`` commands, and checks that torch never got imported.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import runtime_graphs as rg

BLOCKER = '''
import sys

class _NoTorch:
    """Behave as if torch were not installed."""
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the torch-free test)", name=name)
        return None

sys.meta_path.insert(0, _NoTorch())
'''

CHILD = '''
import json, subprocess, sys
import numpy as np

try:
    import torch  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("torch is importable: the blocker did not work")

import diffgap.runtime, diffgap.runtime.session, diffgap.runtime.engine, diffgap.runtime.trt_session
import diffgap.runtime.pipeline, diffgap.runtime.cli_index, diffgap.runtime.cli_search, diffgap.runtime.cli_build_engines
from diffgap.runtime.pipeline import AudioSearch, AudioToTextBridge, TextToAudioBridge, build_index
from diffgap.runtime.session import open_model
from diffgap.core.data import save_pairs

export, work = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
audio = rng.standard_normal((12, 16)).astype(np.float32)
text = rng.standard_normal((12, 16)).astype(np.float32)
ids = np.array([f"a{i}" for i in range(12)])

for prec in ("fp32", "fp16"):
    with open_model(export, "diffgap_text_to_audio", precision=prec) as s:
        out = s.infer(s.io.sample_inputs(3))
        assert out["embedding"].shape == (3, 8)
with TextToAudioBridge(export) as b:
    r = b(["a dog barks", "rain"])
    assert r.bridged.shape == (2, 8) and np.isfinite(r.bridged).all()
with AudioToTextBridge(export) as b:
    r = b(np.full((2, 480000), 0.1, np.float32))
    assert r.bridged.shape == (2, 8)
ix = build_index(export, work + "/ix.npz", audio=audio, ids=ids, text=text, captions=ids)
with AudioSearch(ix, export) as s:
    top, scores = s.search(["a dog barks"], k=3)
    assert top.shape == (1, 3)
    cid, caps, sc = s.search_captions_embeddings(audio[:2], k=2)
    assert cid.shape == (2, 2)

from diffgap.cli import main
save_pairs(work + "/pairs.npz", ids=ids, audio=audio, text=text)
assert main(["index", export, "--npz", work + "/pairs.npz", "--out", work + "/cli.npz"]) == 0
assert main(["search", "a dog barks", "--index", work + "/cli.npz", "-k", "2"]) == 0

leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not leaked, leaked
print("TORCH-FREE-OK")
'''


def test_runtime_runs_without_torch(tmp_path):
    man = rg.make_export(tmp_path / "export")
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(block), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(man.root), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "TORCH-FREE-OK" in proc.stdout
    assert "query: a dog barks" in proc.stdout  # the search command's table


def test_blocker_really_blocks(tmp_path):
    """torch is installed here (so the test above proves something), the blocker refuses it and its
    submodules, and nothing else."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    find = "import importlib.util; print(importlib.util.find_spec('torch') is not None)"
    plain = subprocess.run([sys.executable, "-c", find], capture_output=True, text=True, timeout=120)
    assert plain.stdout.strip() == "True", plain.stderr
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    for mod in ("torch", "torch.nn"):
        proc = subprocess.run([sys.executable, "-c", f"import {mod}"], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "blocked by the torch-free test" in proc.stderr, (mod, proc.stderr[-500:])
    proc = subprocess.run([sys.executable, "-c", "import numpy, onnxruntime"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-500:]
