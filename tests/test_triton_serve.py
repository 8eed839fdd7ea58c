"""`diffgap serve` and TritonServer's lifecycle on the real tritonserver: ready, endpoints printed,
clean shutdown on SIGTERM / Ctrl-C, always stopped (even when the caller fails), clear errors."""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import triton_fixtures
from diffgap.triton_models import repository as R
from diffgap.triton_models.server import TritonServer

pytest.importorskip("pytriton")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    export = triton_fixtures.shared_export(tmp_path_factory)
    return R.build_repository(export, tmp_path_factory.mktemp("serve") / "repo")


@pytest.fixture
def tiny_repo(tmp_path):
    """A one-model repository (python identity) for lifecycle tests that need no diffgap model."""
    _python_model(tmp_path / "tiny", "identity", "import triton_python_backend_utils as pb_utils\n\n"
                  "class TritonPythonModel:\n    def execute(self, requests):\n"
                  "        return [pb_utils.InferenceResponse([pb_utils.Tensor('y', pb_utils.get_input_tensor_by_name(r, 'x').as_numpy())])"
                  " for r in requests]\n")
    return tmp_path / "tiny"


def _python_model(repo: Path, name: str, source: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 1\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\noutput [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
    )
    (repo / name / "1" / "model.py").write_text(source)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_serve_cli_prints_endpoints_and_stops_cleanly(repo, tiny_repo, sig, tmp_path):
    # the generated diffgap repository for SIGTERM, a one-model one for Ctrl-C (same code path, faster)
    target = repo if sig == signal.SIGTERM else tiny_repo
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffgap.cli", "serve", str(target), "--log-file", str(tmp_path / "server.log")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C or SIGTERM" in line or proc.poll() is not None:
                break
        text = "".join(lines)
        m_pid = re.search(r"tritonserver ready \(pid (\d+)\)", text)
        m_http = re.search(r"HTTP\s+(127\.0\.0\.1:\d+)", text)
        assert m_pid and m_http and re.search(r"gRPC\s+127\.0\.0\.1:\d+", text), text
        with urllib.request.urlopen(f"http://{m_http.group(1)}/v2/health/ready", timeout=10) as r:
            assert r.status == 200
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, text + rest
    assert "tritonserver stopped" in rest
    assert "Started HTTPService" in (tmp_path / "server.log").read_text()
    assert _wait_gone(int(m_pid.group(1))), "tritonserver outlived `diffgap serve`"


def test_context_manager_stops_the_server_when_the_body_fails(tiny_repo):
    server = TritonServer(tiny_repo)
    with pytest.raises(RuntimeError, match="boom"):
        with server:
            pid = server.pid
            assert server.http_client().is_server_ready()
            raise RuntimeError("boom")
    assert not server.running() and _wait_gone(pid)
    with pytest.raises(RuntimeError, match="not running"):
        server.http_url


def test_a_model_that_fails_to_load_is_reported_with_the_log(tmp_path):
    broken = tmp_path / "broken"
    _python_model(broken, "bad", "raise ImportError('this model cannot load')\n")
    server = TritonServer(broken, startup_timeout=120, log_path=tmp_path / "server.log")
    with pytest.raises(RuntimeError, match="(?s)before becoming ready.*failed to load 'bad'.*this model cannot load"):
        server.start()
    assert not server.running()


def test_the_torch_blocker_used_by_the_server_tests_works(tmp_path):
    """test_triton_server.py serves with torch blocked; prove the blocker blocks."""
    repo = tmp_path / "repo"
    _python_model(repo, "uses_torch", "import torch\n")
    (tmp_path / "blocker").mkdir()
    server = TritonServer(repo, cwd=triton_fixtures.torch_blocker(tmp_path / "blocker"), log_path=tmp_path / "server.log")
    with pytest.raises(RuntimeError, match="torch is blocked"):
        server.start()


def test_not_a_repository(tmp_path):
    with pytest.raises(FileNotFoundError, match="triton-repo"):
        TritonServer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.pbtxt"):
        TritonServer(tmp_path)


def test_binding_beyond_loopback_warns(repo, caplog):
    with caplog.at_level(logging.WARNING, logger="diffgap.triton_models.server"):
        TritonServer(repo, host="0.0.0.0")
    assert "other machines" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffgap.triton_models.server"):
        TritonServer(repo)
    assert not caplog.text


def test_demo_search_answers_like_the_runtime(tmp_path_factory, tmp_path):
    """The serving leg of `make demo`: pairs -> index -> portable repo -> server -> HTTP queries."""
    import numpy as np

    from diffgap.core.data import save_pairs
    from diffgap.core.manifest import Manifest
    from diffgap.runtime import AudioSearch
    from diffgap.triton_models import demo_search

    export = triton_fixtures.shared_export(tmp_path_factory)
    rng = np.random.default_rng(5)
    audio = rng.standard_normal((12, Manifest.load(export).embed_dim)).astype(np.float32)
    pairs = save_pairs(tmp_path / "pairs.npz", ids=[f"sound{i}" for i in range(12)], audio=audio, text=audio[::-1].copy())
    queries = ["a dog barks", "rain on a tin roof"]
    result = demo_search(export, pairs, queries, k=3, work_dir=tmp_path / "work")
    assert result.queries == queries and len(result.latency_ms) == 2 and all(ms > 0 for ms in result.latency_ms)
    with AudioSearch(tmp_path / "work" / "index", export) as search:
        for q, ids, scores in zip(queries, result.ids, result.scores):
            ref_ids, ref_scores = search.search([q], k=3)
            assert ids == list(ref_ids[0])
            assert np.max(np.abs(np.asarray(scores) - ref_scores[0])) <= 1e-5
    assert "requests over HTTP" in result.table()
    with pytest.raises(ValueError, match="non-empty"):
        demo_search(export, pairs, [""])


def test_ports_in_use(tiny_repo, tmp_path, monkeypatch):
    import socket

    from diffgap.triton_models import server as S

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # an explicit port that is taken: a clear error, nothing left running
        fixed = TritonServer(tiny_repo, http_port=port, log_path=tmp_path / "fixed.log")
        with pytest.raises(RuntimeError, match="could not bind"):
            fixed.start()
        assert not fixed.running()
        # a picked port taken before the server binds it: picked again
        picks = []
        real = S.free_port

        def first_pick_is_taken(host):
            picks.append(host)
            return port if len(picks) == 1 else real(host)

        monkeypatch.setattr(S, "free_port", first_pick_is_taken)
        with TritonServer(tiny_repo, log_path=tmp_path / "retry.log") as server:
            assert server.http_client().is_server_ready() and server.endpoints.http_port != port
