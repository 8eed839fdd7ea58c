"""`diffgap serve` and TritonServer's lifecycle on the real tritonserver: ready behind the nginx proxy,
endpoints printed, clean shutdown of both on SIGTERM / Ctrl-C, always stopped (even when the caller
fails), clear errors; tritonserver on loopback only; the proxy's body limit computed from the
repository's declarations, checked against real request encodings, the same beyond loopback."""
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


def _have_nginx() -> bool:
    from diffgap.core.errors import UserError
    from diffgap.triton_models.nginx import find_nginx

    try:
        return bool(find_nginx())
    except UserError:
        return False


needs_nginx = pytest.mark.skipif(not _have_nginx(), reason="nginx not installed (`make setup` installs it)")


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


def test_the_launch_wrapper_hands_serve_ignored_stop_signals():
    """The premise of the test below: what it starts inherits SIGINT and SIGTERM as ignored."""
    probe = "import signal; print(signal.getsignal(signal.SIGINT).name, signal.getsignal(signal.SIGTERM).name)"
    out = subprocess.run(["bash", "-c", 'trap "" INT TERM; exec "$@"', "probe", sys.executable, "-c", probe],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["SIG_IGN", "SIG_IGN"], out


@needs_nginx
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_serve_cli_prints_endpoints_and_stops_cleanly(repo, tiny_repo, sig, tmp_path):
    # the generated diffgap repository for SIGTERM, a one-model one for Ctrl-C (same code path, faster)
    target = repo if sig == signal.SIGTERM else tiny_repo
    serve = [sys.executable, "-m", "diffgap.cli", "serve", str(target), "--log-file", str(tmp_path / "server.log")]
    # Started with SIGINT and SIGTERM ignored, as a background job of a script without job control
    # starts it (ignored dispositions survive exec): serve must install its own handlers, and the
    # outcome does not depend on how pytest itself was started.
    proc = subprocess.Popen(
        ["bash", "-c", 'trap "" INT TERM; exec "$@"', "serve", *serve],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    m_nginx = None
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C or SIGTERM" in line or proc.poll() is not None:
                break
        text = "".join(lines)
        m_pid = re.search(r"tritonserver ready \(pid (\d+)\)", text)
        m_nginx = re.search(r"proxy ready \(nginx pid (\d+)\)", text)
        m_http = re.search(r"HTTP\s+(127\.0\.0\.1:\d+)", text)
        m_metrics = re.search(r"metrics\s+(http://127\.0\.0\.1:\d+/metrics)", text)
        assert m_pid and m_nginx and m_http and m_metrics and re.search(r"gRPC\s+127\.0\.0\.1:\d+", text), text
        assert re.search(r"limits\s+HTTP bodies up to [\d.]+ MB", text), text
        # Triton's own endpoints answer through the proxy
        with urllib.request.urlopen(f"http://{m_http.group(1)}/v2/health/ready", timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(m_metrics.group(1), timeout=10) as r:
            assert b"nv_inference_count" in r.read()
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, text + rest
    assert f"{sig.name}: stopping" in rest and "tritonserver stopped" in rest
    assert "Started HTTPService" in (tmp_path / "server.log").read_text()
    assert _wait_gone(int(m_pid.group(1))), "tritonserver outlived `diffgap serve`"
    assert _wait_gone(int(m_nginx.group(1))), "nginx outlived `diffgap serve`"


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


def test_tritonserver_binds_loopback_only(repo):
    with pytest.raises(ValueError, match="loopback only.*proxy"):
        TritonServer(repo, host="0.0.0.0")


@needs_nginx
def test_beyond_loopback_the_proxy_is_as_protected_as_on_loopback(repo, caplog):
    """`diffgap serve --host 0.0.0.0`: same body limits, tritonserver still on 127.0.0.1 (config only:
    tests never listen beyond loopback)."""
    from diffgap.triton_models.nginx import ProxyPorts, nginx_config
    from diffgap.triton_models.proxy import ProxiedServer
    from diffgap.triton_models.server import Endpoints

    pytest.importorskip("tritonclient.grpc")
    with caplog.at_level(logging.WARNING, logger="diffgap.triton_models.proxy"):
        wide = ProxiedServer(repo, host="0.0.0.0")
    assert "other machines" in caplog.text
    assert wide.limits == ProxiedServer(repo).limits and wide.triton.host == "127.0.0.1"
    up = Endpoints("127.0.0.1", 8000, 8001, 8002)
    conf = {h: nginx_config(Path("/p"), ProxyPorts(h, 9000, 9001, 9002), up, wide.limits) for h in ("127.0.0.1", "0.0.0.0")}
    strip = lambda c: [l for l in c.splitlines() if "listen " not in l]  # noqa: E731
    assert strip(conf["127.0.0.1"]) == strip(conf["0.0.0.0"])
    assert f"client_max_body_size {wide.limits.http_bytes};" in conf["0.0.0.0"]
    assert f"client_max_body_size {wide.limits.grpc_bytes};" in conf["0.0.0.0"]
    assert "server 127.0.0.1:8000;" in conf["0.0.0.0"] and "server 127.0.0.1:8001;" in conf["0.0.0.0"]
    with pytest.raises(ValueError, match="must bind 127.0.0.1"):
        nginx_config(Path("/p"), ProxyPorts("0.0.0.0", 1, 2, 3), Endpoints("0.0.0.0", 4, 5, 6), wide.limits)


def _limits_repo(root: Path, dims_x: str = "50") -> Path:
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "config.pbtxt").write_text(
        'name: "m"\nbackend: "python"\nmax_batch_size: 4\n'
        f'input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {dims_x} ] }}, {{ name: "ids" data_type: TYPE_INT64 dims: [ 3 ] }},'
        ' { name: "s" data_type: TYPE_STRING dims: [ 1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'parameters [ { key: "max_text_bytes" value { string_value: "16" } } ]\n'
    )
    return root


def test_limits_cover_the_worst_legal_encoding_of_every_protocol(tmp_path):
    """The limit vs real encodings of the largest legal request, made by tritonclient (JSON, binary) and
    protobuf (gRPC raw and typed contents), with the longest values: -1.1754944e-38, int64 min, a
    caption of control bytes (each escaped as \\u00XX in JSON)."""
    import numpy as np

    httpclient = pytest.importorskip("tritonclient.http")
    service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
    from diffgap.triton_models.limits import HEADROOM_BYTES, HEADROOM_FACTOR, request_limits

    lim = request_limits(_limits_repo(tmp_path))
    x = np.full((4, 50), np.float32(-1.1754944e-38))
    ids = np.full((4, 3), np.iinfo(np.int64).min, np.int64)
    s = np.full((4, 1), b"\x01" * 16, dtype=object)

    def http_body(binary):
        ins = []
        for name, arr, dt in (("x", x, "FP32"), ("ids", ids, "INT64"), ("s", s, "BYTES")):
            t = httpclient.InferInput(name, list(arr.shape), dt)
            t.set_data_from_numpy(arr, binary_data=binary)
            ins.append(t)
        return len(httpclient.InferenceServerClient.generate_request_body(ins)[0])

    def grpc_message(raw):
        req = service_pb2.ModelInferRequest(model_name="m")
        for name, arr, dt in (("x", x, "FP32"), ("ids", ids, "INT64"), ("s", s, "BYTES")):
            t = req.inputs.add(name=name, datatype=dt, shape=list(arr.shape))
            if raw:
                req.raw_input_contents.append(b"".join(len(v).to_bytes(4, "little") + v for v in arr.reshape(-1))
                                              if dt == "BYTES" else arr.tobytes())
            elif dt == "FP32":
                t.contents.fp32_contents.extend(arr.reshape(-1).tolist())
            elif dt == "INT64":
                t.contents.int64_contents.extend(arr.reshape(-1).tolist())
            else:
                t.contents.bytes_contents.extend(list(arr.reshape(-1)))
        return req.ByteSize()

    legal_http, legal_grpc = lim.largest_http[1], lim.largest_grpc[1]
    worst_http = max(http_body(False), http_body(True))
    worst_grpc = max(grpc_message(True), grpc_message(False))
    # the computed largest legal request is the worst real encoding, within its header bytes
    assert 0.9 * legal_http <= worst_http <= legal_http + 1024, (worst_http, legal_http)
    assert 0.9 * legal_grpc <= worst_grpc <= legal_grpc + 1024, (worst_grpc, legal_grpc)
    assert lim.http_bytes == int(legal_http * HEADROOM_FACTOR) + HEADROOM_BYTES >= worst_http
    assert lim.grpc_bytes == int(legal_grpc * HEADROOM_FACTOR) + HEADROOM_BYTES >= worst_grpc


@needs_nginx
def test_a_repository_without_a_largest_request_needs_an_explicit_limit(tmp_path):
    from diffgap.core.errors import UserError
    from diffgap.triton_models.limits import UnboundedInput, request_limits
    from diffgap.triton_models.proxy import ProxiedServer

    pytest.importorskip("tritonclient.grpc")
    repo = _limits_repo(tmp_path / "r", dims_x="-1")
    with pytest.raises(UnboundedInput, match="variable dimension"):
        request_limits(repo)
    with pytest.raises(UserError, match="--max-body-size"):
        ProxiedServer(repo)
    assert ProxiedServer(repo, max_body_size=10_000_000).limits.http_bytes == 10_000_000
    with pytest.raises(UserError, match="positive"):
        ProxiedServer(repo, max_body_size=0)


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


@needs_nginx
def test_a_taken_proxy_port_is_a_clear_error_and_stops_tritonserver(tiny_repo):
    import socket

    from diffgap.triton_models.proxy import ProxiedServer

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        stack = ProxiedServer(tiny_repo, http_port=busy.getsockname()[1])
        with pytest.raises(RuntimeError, match="nginx could not bind its ports"):
            stack.start()
        assert stack.triton.proc is None and not stack.running()


@needs_nginx
def test_proxy_reports_a_dead_tritonserver_as_unavailable_and_stops_with_it(tiny_repo):
    """Behind the proxy, tritonserver gone reads 502 (HTTP) / UNAVAILABLE (gRPC, not an HTTP status a
    gRPC client cannot map); stopping the stack leaves neither process running."""
    import urllib.error

    from tritonclient.utils import InferenceServerException

    from diffgap.triton_models.proxy import ProxiedServer

    stack = ProxiedServer(tiny_repo)
    with stack:
        nginx_pid, triton_pid = stack.proxy_pid, stack.pid
        assert stack.http_client().is_server_ready() and stack.grpc_client().is_server_ready()
        assert stack.upstream.host == "127.0.0.1" and stack.upstream.http_port != int(stack.http_url.rsplit(":", 1)[1])
        grpc_url, http_url = stack.grpc_url, stack.http_url
        stack.triton._terminate()
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(grpc_url)
        try:
            with pytest.raises(InferenceServerException) as e:
                client.is_server_ready()
            assert str(e.value.status()) == "StatusCode.UNAVAILABLE" and "unavailable" in str(e.value)
        finally:
            client.close()
        with pytest.raises(urllib.error.HTTPError) as h:
            urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=10)
        assert h.value.code == 502 and "unavailable" in h.value.read().decode()
    assert not stack.running() and _wait_gone(nginx_pid) and _wait_gone(triton_pid)
