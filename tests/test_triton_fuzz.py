"""Serving that survives its users, on the real tritonserver behind the nginx proxy (`diffgap serve`'s layout).

- every request class of every model (ensembles and python models; tests/serving_cases.py), over
  HTTP (binary tensors and JSON) and gRPC: valid ones answered (the ensembles' answers equal the in-process runtime's), client
  mistakes answered HTTP 400 / gRPC INVALID_ARGUMENT with their one-line message;
- malformed HTTP bodies get the statuses the README's serving section documents;
- oversized bodies -- a declared 2.5 GiB body (past the size that crashes tritonserver 2.51), a
  chunked body and a gRPC message, each generated chunk by chunk and never held in memory -- are
  refused by the proxy, and tritonserver (same process) still answers correctly afterwards;
- the largest legal gRPC request passes the proxy's limit;
- a short sustained load (8 clients x 10 s, 10 % malformed): no wrong answer, none lost.

One proxied server per module on 127.0.0.1, its python models with ``import torch`` blocked. Every
loop is bounded in count and time.
"""
from __future__ import annotations

import http.client
import json
import select
import socket
import time

import numpy as np
import pytest

import serving_cases as SC
import triton_fixtures
from diffgap.runtime import AudioSearch, AudioToTextBridge, TextToAudioBridge
from diffgap.triton_models import repository as R

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from diffgap.core.errors import UserError  # noqa: E402
from diffgap.triton_models.nginx import find_nginx  # noqa: E402
from diffgap.triton_models.proxy import ProxiedServer  # noqa: E402

try:
    find_nginx()
except UserError as e:  # `make setup` installs it; a bare `pytest` on a machine without it skips
    pytest.skip(str(e), allow_module_level=True)

TOL = 1e-5  # max abs vs the in-process runtime (same graphs, same noise)
K = 5
PROTOCOLS = ("http", "grpc")
MiB = 1 << 20


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    export = triton_fixtures.shared_export(tmp_path_factory)
    index = triton_fixtures.shared_index(tmp_path_factory)
    repo = R.build_repository(export, tmp_path_factory.mktemp("fuzz") / "repo", flavor="portable", index=index, top_k=K)
    return export, index, repo


@pytest.fixture(scope="module")
def stack(env, tmp_path_factory):
    srv = ProxiedServer(env[2], cwd=triton_fixtures.torch_blocker(tmp_path_factory.mktemp("notorch")))
    with srv:
        yield srv
    assert not srv.running()


@pytest.fixture(scope="module")
def configs(stack):
    client = stack.http_client()
    return {m["name"]: client.get_model_config(m["name"]) for m in client.get_model_repository_index()}


@pytest.fixture(scope="module")
def canary_reference(env):
    with TextToAudioBridge(env[0]) as bridge:
        return bridge([SC.VALID_TEXT], seed=[1]).bridged


def _client(stack, protocol):
    return stack.http_client() if protocol == "http" else stack.grpc_client()


def _mod(protocol):
    return httpclient if protocol == "http" else grpcclient


def _canary(stack, reference, pid):
    """tritonserver is the same process, ready through the proxy, and answers correctly on both protocols."""
    assert stack.running() and stack.pid == pid, "tritonserver restarted or died"
    for protocol in PROTOCOLS:
        client, mod = _client(stack, protocol), _mod(protocol)
        assert client.is_server_live() and client.is_server_ready()
        inputs = SC.client_inputs(mod, [SC.Tensor(R.TEXT, "BYTES", np.array([[SC.VALID_TEXT.encode()]], dtype=object)),
                                        SC.Tensor(R.SEED, "INT64", np.array([[1]], np.int64))])
        got = client.infer(R.embedding_ensemble("text", "audio"), inputs).as_numpy(R.OUTPUTS["bridged"])
        assert np.max(np.abs(got - reference)) <= TOL


def _reference(env, case):
    """In-process answer for a valid request to an ensemble: {output name: array}; None for the others."""
    export, index, _ = env
    arrays = {t.name: t.array for t in case.inputs}
    seed = [int(s) for s in arrays[R.SEED].reshape(-1)] if R.SEED in arrays else None
    if case.model == R.SEARCH_ENSEMBLE:
        with AudioSearch(index, export) as search:
            ids, scores = search.search([b.decode() for b in arrays[R.TEXT].reshape(-1)], k=K, seed=seed)
        return {R.SEARCH_IDS: ids, R.SEARCH_SCORES: scores}
    for (src, tgt), bridge_cls in ((("text", "audio"), TextToAudioBridge), (("audio", "text"), AudioToTextBridge)):
        if case.model == R.embedding_ensemble(src, tgt):
            with bridge_cls(export) as bridge:
                guide = [v for k, v in arrays.items() if "guidance" in k]
                source = ([b.decode() for b in arrays[R.TEXT].reshape(-1)] if src == "text"
                          else arrays[bridge.encoder.io.inputs[0].name])
                ref = bridge(source, seed=seed, guidance_scale=float(guide[0].reshape(-1)[0]) if guide else None)
            return {R.OUTPUTS["clap"]: ref.source, R.OUTPUTS["projected"]: ref.projected, R.OUTPUTS["bridged"]: ref.bridged}
    return None


@pytest.mark.timeout(600)
@pytest.mark.parametrize("protocol", ("http", "http-json", "grpc"))
def test_every_request_class_of_every_model_gets_its_documented_answer(stack, env, configs, canary_reference, protocol):
    """``http`` sends tensors in Triton's binary extension, ``http-json`` as JSON data lists (the large
    encoding), ``grpc`` as raw protobuf contents."""
    binary = protocol != "http-json"
    protocol = protocol.partition("-")[0]
    client, mod = _client(stack, protocol), _mod(protocol)
    pid = stack.pid
    failures, n = [], 0
    all_cases = [c for cfg in configs.values() for c in SC.cases(cfg, R.MAX_TEXT_BYTES)]
    all_cases.append(SC.Case("no_such_model", "unknown model", all_cases[0].inputs))
    assert 50 < len(all_cases) < 400, len(all_cases)  # bounded: a few dozen classes per model
    kinds = {c.kind for c in all_cases}
    assert kinds >= set(SC.EXPECTED_WORDS) | {"valid"}, sorted(set(SC.EXPECTED_WORDS) - kinds)
    for case in all_cases:
        n += 1
        if not binary and sum(t.array.size for t in case.inputs) > 100_000:
            continue  # waveforms: ~10 MB of JSON text per row, slow to write and parse; the binary run covers them
        outs = [mod.InferRequestedOutput(o) for o in case.outputs] or None
        try:
            inputs = SC.client_inputs(mod, case.inputs, binary=binary)
        except InferenceServerException:
            assert not binary and case.kind == "invalid utf-8", case.label  # JSON cannot carry non-UTF-8 bytes
            continue
        try:
            result = client.infer(case.model, inputs, outputs=outs)
        except InferenceServerException as e:
            status, msg = str(e.status()), str(e)
            if case.kind == "valid" or not SC.is_documented_answer(case.kind, status, msg) or "\n" in msg:
                failures.append(f"{case.label}: {status} {msg[:300]}")
            continue
        if case.kind != "valid":
            failures.append(f"{case.label}: answered 200")
            continue
        ref = _reference(env, case)
        for out in configs[case.model]["output"]:
            got = result.as_numpy(out["name"])
            if got is None or got.shape[0] != 1:
                failures.append(f"{case.label}: output {out['name']} missing or not batch 1")
            elif ref is not None and got.dtype != object and np.max(np.abs(got - ref[out["name"]])) > TOL:
                failures.append(f"{case.label}: {out['name']} differs from the in-process runtime")
            elif ref is not None and got.dtype == object and list(got.astype(str)[0]) != list(ref[out["name"]][0]):
                failures.append(f"{case.label}: {out['name']} {got} differs from the in-process runtime")
            elif got.dtype.kind == "f" and not np.isfinite(got).all():
                failures.append(f"{case.label}: {out['name']} not finite")
    assert not failures, f"{len(failures)} of {n} requests answered otherwise than documented:\n" + "\n".join(failures[:20])
    _canary(stack, canary_reference, pid)


# Malformed HTTP bodies (path, body, headers) -> (status, words): the statuses tritonserver 2.51's HTTP
# front gives; the proxy passes them through (see the README's serving section for why 500 stays 500).
MALFORMED_HTTP = {
    "not json": (b"not json", {}, 500, "failed to parse the request json"),
    "truncated json": (b'{"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["a d', {}, 500, "failed to parse the request json"),
    "no inputs member": (b"{}", {}, 500, "unable to parse 'inputs'"),
    "data does not match shape": (json.dumps({"inputs": [{"name": R.TEXT, "shape": [2, 1], "datatype": "BYTES", "data": ["a dog"]}]}).encode(),
                                  {}, 400, "expected 2 string elements"),
    "unknown datatype": (json.dumps({"inputs": [{"name": R.TEXT, "shape": [1, 1], "datatype": "FOO", "data": ["a dog"]}]}).encode(),
                         {}, 400, "invalid datatype"),
    "binary header longer than body": (b'{"inputs": []}', {"Inference-Header-Content-Length": "100"}, 400, "inference header size"),
}


@pytest.mark.parametrize("case", list(MALFORMED_HTTP))
def test_malformed_http_body_gets_the_documented_status(stack, canary_reference, case):
    body, headers, status, words = MALFORMED_HTTP[case]
    pid = stack.pid
    host, port = stack.http_url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", f"/v2/models/{R.embedding_ensemble('text', 'audio')}/infer", body=body, headers=headers)
        r = conn.getresponse()
        text = r.read().decode(errors="replace")
    finally:
        conn.close()
    assert r.status == status and words in json.loads(text)["error"].lower(), (r.status, text)
    _canary(stack, canary_reference, pid)


# -- oversized bodies -----------------------------------------------------------------------------
def _readable(sock, timeout=0.0) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def _stream_http(stack, model, chunked: bool, declared: int, budget: int, deadline_s: float = 120.0):
    """POST a JSON body generated 1 MiB at a time until the proxy answers; (status, body, bytes sent)."""
    host, port = stack.http_url.rsplit(":", 1)
    chunk = b"0.25, " * (MiB // 6)
    head = f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {declared}\r\n\r\n"
    prefix = json.dumps({"inputs": [{"name": "waveform", "shape": [1, 1], "datatype": "FP32"}]})[:-3].encode() + b', "data": ['
    sent, deadline = 0, time.monotonic() + deadline_s
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode())
        try:
            for piece in [prefix] + [chunk] * (budget // len(chunk) + 1):
                if _readable(sock) or time.monotonic() > deadline:
                    break  # the proxy has answered (it refuses as soon as it knows)
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed while we were still sending
        assert _readable(sock, timeout=30), f"no answer after {sent} bytes"
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 4 + _content_length(data):
            more = sock.recv(65536)
            if not more:
                break
            data += more
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2].decode(errors="replace"), sent


def _content_length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def _stream_grpc(stack, declared: int, budget: int, deadline_s: float = 120.0):
    """One gRPC ModelInfer message of ``declared`` bytes over raw HTTP/2 (h2), zeros sent as flow control
    allows, until the proxy answers; (response headers and trailers, bytes sent)."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions

    host, port = stack.grpc_url.rsplit(":", 1)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    headers: dict[str, str] = {}
    sent, done, deadline = 0, False, time.monotonic() + deadline_s
    zeros = bytes(MiB)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", stack.grpc_url),
                                (":path", "/inference.GRPCInferenceService/ModelInfer"),
                                ("content-type", "application/grpc"), ("te", "trailers")])
        conn.send_data(sid, b"\x00" + declared.to_bytes(4, "big"))  # gRPC frame: uncompressed, length
        sock.sendall(conn.data_to_send())
        while not done and sent < budget and time.monotonic() < deadline:
            window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, len(zeros))
            if _readable(sock, 0 if window > 0 else 5):
                data = sock.recv(65536)
                if not data:
                    break
                for ev in conn.receive_data(data):
                    if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                        headers.update(dict(ev.headers))
                    if isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)):
                        done = True
                sock.sendall(conn.data_to_send())
                continue
            if window > 0:
                try:
                    conn.send_data(sid, zeros[:window])
                except h2.exceptions.StreamClosedError:
                    break
                sock.sendall(conn.data_to_send())
                sent += window
    return headers, sent


OVERSIZED = ("http declared 2.5 GiB", "http chunked", "grpc message")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", OVERSIZED)
def test_oversized_body_is_refused_by_the_proxy_and_tritonserver_keeps_answering(stack, canary_reference, case):
    pid = stack.pid
    limits = stack.limits
    if case.startswith("http"):
        declared = int(2.5 * (1 << 30))  # past the 2 GiB that makes tritonserver 2.51 die with SIGSEGV
        status, body, sent = _stream_http(stack, R.encoder_name("audio"), chunked=case.endswith("chunked"),
                                          declared=declared, budget=limits.http_bytes + 64 * MiB)
        assert status == 413, body
        assert f"larger than {limits.http_bytes} bytes" in json.loads(body)["error"]
        if case.endswith("chunked"):  # refused once the body crossed the limit, not before
            assert limits.http_bytes - 4 * MiB <= sent <= limits.http_bytes + 64 * MiB
    else:
        headers, sent = _stream_grpc(stack, declared=limits.grpc_bytes + 64 * MiB, budget=limits.grpc_bytes + 64 * MiB)
        assert headers.get("grpc-status") == "8", headers  # RESOURCE_EXHAUSTED
        assert f"larger than {limits.grpc_bytes} bytes" in headers.get("grpc-message", "").replace("%20", " ")
        assert sent >= limits.grpc_bytes - 4 * MiB
    _canary(stack, canary_reference, pid)


@pytest.mark.timeout(300)
def test_the_largest_legal_grpc_request_passes_the_limit(stack, configs, canary_reference):
    """A max-batch waveform request (the repository's largest raw input) is served, not refused."""
    model = R.encoder_name("audio")
    cfg = configs[model]
    batch = int(cfg["max_batch_size"])
    (wave,) = SC.valid_inputs(cfg, batch=1)
    big = SC.Tensor(wave.name, wave.datatype, np.repeat(wave.array, batch, axis=0))
    assert big.array.nbytes <= stack.limits.grpc_bytes
    client = stack.grpc_client()
    one = client.infer(model, SC.client_inputs(grpcclient, [wave])).as_numpy(cfg["output"][0]["name"])
    many = client.infer(model, SC.client_inputs(grpcclient, [big])).as_numpy(cfg["output"][0]["name"])
    assert many.shape[0] == batch and np.max(np.abs(many - one)) <= TOL
    _canary(stack, canary_reference, stack.pid)


@pytest.mark.timeout(300)
def test_short_sustained_load_with_malformed_requests(stack, env, canary_reference):
    from benchmarks.serving_load import sustained_load

    pid = stack.pid
    rec = sustained_load(stack.http_url, stack.grpc_url, env[0], clients=8, duration_s=10.0, bad_fraction=0.1)
    assert rec["wrong"] == 0 and rec["lost"] == 0 and rec["undocumented"] == 0 and rec["unanswered"] == 0, rec["examples"]
    assert rec["correct"] > 0 and rec["refused_as_documented"] > 0
    assert rec["correct"] + rec["refused_as_documented"] == rec["sent"]
    assert rec["latency"]["all"]["p99_ms"] > 0
    _canary(stack, canary_reference, pid)
