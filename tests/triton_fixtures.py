"""Export directory + gallery index for the Triton tests (tests/test_triton_*.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from diffgap.core.manifest import Manifest
from diffgap.runtime import build_index

N_GALLERY = 24
_CACHE: dict[str, Path] = {}


def shared_export(tmp_path_factory) -> Path:
    """One export directory per test session, shared by every tests/test_triton_*.py module (read-only:
    a test that changes it works on a copy)."""
    if "export" not in _CACHE:
        _CACHE["export"] = make_export(tmp_path_factory.mktemp("triton_export") / "export")
    return _CACHE["export"]


def shared_index(tmp_path_factory) -> Path:
    if "index" not in _CACHE:
        _CACHE["index"] = make_index(shared_export(tmp_path_factory), tmp_path_factory.mktemp("triton_index") / "index.npz")
    return _CACHE["index"]


def make_export(root: Path) -> Path:
    """The real export pipeline on the tiny presets: a clap-tiny DiffGAP with randomised weights
    (fresh zero-initialised output layers would make the sampler trivial) and the ``tiny`` CLAP
    encoders, K = 4 steps, FP32 + FP16 graphs (the gpu flavour ships the FP16 ones)."""
    import torch

    from diffgap.checkpoint import save_checkpoint
    from diffgap.config import get_preset
    from diffgap.export.cli import export_all
    from diffgap.models import DiffGAP

    torch.manual_seed(0)
    model = DiffGAP(get_preset("clap-tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = save_checkpoint(root.parent / "checkpoint", model)
    export_all(ckpt, root, steps=4, encoders="tiny")
    return root


def make_index(export: Path, out: Path) -> Path:
    man = Manifest.load(export)
    rng = np.random.default_rng(11)
    audio = rng.standard_normal((N_GALLERY, man.embed_dim)).astype(np.float32)
    audio /= np.linalg.norm(audio, axis=1, keepdims=True)
    ids = np.array([f"clip{i:03d}" for i in range(N_GALLERY)])
    return build_index(export, out, audio=audio, ids=ids)


def torch_blocker(root: Path) -> Path:
    """A directory whose ``torch`` package fails to import. The python-backend stubs put their working
    directory first on sys.path (they ignore PYTHONPATH), so a server run from it blocks torch."""
    (root / "torch").mkdir(parents=True)
    (root / "torch" / "__init__.py").write_text("raise ImportError('torch is blocked: Triton python models must be torch-free')\n")
    return root


def served_search(repo: Path, work: Path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Start tritonserver on ``repo`` (torch import blocked), send ``texts`` to the text -> audio search
    ensemble over HTTP; returns its (ids as str, scores), each (len(texts), k)."""
    import tritonclient.http as httpclient

    from diffgap.triton_models import repository as R
    from diffgap.triton_models.server import TritonServer

    with TritonServer(repo, cwd=torch_blocker(work / "notorch")) as server:
        client = server.http_client()
        x = httpclient.InferInput(R.TEXT, [len(texts), 1], "BYTES")
        x.set_data_from_numpy(np.array([[t.encode("utf-8")] for t in texts], dtype=object))
        r = client.infer(R.SEARCH_ENSEMBLE, [x])
    return r.as_numpy(R.SEARCH_IDS).astype(str), r.as_numpy(R.SEARCH_SCORES)
