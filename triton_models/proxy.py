"""nginx in front of tritonserver: the only thing that listens beyond loopback, and the body-size limit.

Why: tritonserver 2.51 (the release bundled in nvidia-pytriton 0.7.0) has no request-size option
(``--http-max-input-size`` came in later releases), and a single HTTP body over 2 GiB makes it die
with SIGSEGV, taking the python-backend stubs with it. The fix a Triton operator uses in production
is a reverse proxy with a body limit; this module starts and configures one.

Layout (:class:`ProxiedServer`, what ``diffgap serve`` runs):

- tritonserver binds 127.0.0.1 only, on free ports (:class:`.server.TritonServer`);
- nginx listens on ``--host`` (loopback by default) with three public ports: HTTP/REST
  (``proxy_pass``), gRPC over cleartext HTTP/2 (``grpc_pass``) and metrics; every path, Triton's
  ``/v2/health/ready`` included, is passed through unchanged;
- ``client_max_body_size`` is the repository's largest legal request per protocol plus headroom
  (:func:`.limits.request_limits`). A larger HTTP body is answered 413 with a JSON ``{"error": ...}``
  (the KServe v2 error shape, which tritonclient reads) before anything reaches tritonserver: a
  declared ``Content-Length`` above the limit right after the headers, a chunked body as soon as it
  crosses it (request bodies are buffered by nginx, so tritonserver never sees a partial one). A gRPC
  stream crossing the limit is answered ``RESOURCE_EXHAUSTED`` (grpc-status 8) with the same message,
  and tritonserver unreachable is ``UNAVAILABLE`` (14) rather than an HTTP 502 a gRPC client cannot read.
  The limit on a gRPC stream counts the whole stream: a ``ModelStreamInfer`` stream carries at most
  the limit in total before a client must open a new one.
- the limit does not depend on ``--host``: binding beyond loopback is never less protected.

What the proxy does not change: Triton's HTTP front answers a malformed JSON body ("not json", a
truncated body) with 500 itself. nginx sees only the status and cannot tell that 500 from a
genuine internal failure without reading every error body, and mapping every 500 to 400 would hide
real faults, so those answers pass through unchanged (the serving section of the README lists them).

The nginx config and process live in :mod:`.nginx` (config written atomically into a private
directory, ``nginx -t`` first, nginx in the foreground as our child, stopped by SIGQUIT then SIGKILL).
"""
from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from diffgap.core.errors import UserError

from .limits import RequestLimits, request_limits
from .lifecycle import PortInUse, start_on_free_ports
from .nginx import NginxProxy, ProxyPorts, _listen, find_nginx
from .server import LOOPBACK, Endpoints, TritonServer, free_port

log = logging.getLogger(__name__)


class ProxiedServer:
    """tritonserver on loopback behind nginx on ``host``: what ``diffgap serve`` runs.

    Same client surface as :class:`.server.TritonServer` (``http_url``, ``grpc_url``, ``http_client()``,
    ``grpc_client()``, ``models``, a context manager that always stops both), pointing at the proxy.
    ``max_body_size`` overrides the computed limit (both protocols), for a repository whose inputs
    have no declared bound. ``triton_kw`` go to :class:`.server.TritonServer` (never ``host``).
    """

    def __init__(self, repository: str | os.PathLike, host: str = LOOPBACK, http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None,
                 max_body_size: int | None = None, **triton_kw) -> None:
        if "host" in triton_kw:
            raise ValueError("tritonserver always binds loopback behind the proxy; `host` is the proxy's")
        self.triton = TritonServer(repository, **triton_kw)
        self.repository = self.triton.repository
        self.models = self.triton.models
        self.host = host
        self._ports = (http_port, grpc_port, metrics_port)
        if max_body_size is not None:
            if max_body_size <= 0:
                raise UserError(f"--max-body-size must be a positive number of bytes, got {max_body_size}")
            self.limits = RequestLimits(max_body_size, max_body_size, ("(given)", max_body_size), ("(given)", max_body_size))
        else:
            try:
                self.limits = request_limits(self.repository)
            except ValueError as e:
                raise UserError(f"{e}: the largest legal request cannot be computed; give the limit with --max-body-size BYTES") from None
        find_nginx()  # fail before starting anything
        self.proxy: NginxProxy | None = None
        self._workdir: Path | None = None
        if host not in (LOOPBACK, "localhost", "::1"):
            log.warning("proxy listening on %s: Triton's endpoints are reachable from other machines, with no "
                        "authentication (body size still limited: %s)", host, self.limits.describe())

    # -- lifecycle -------------------------------------------------------------------------
    def running(self) -> bool:
        return self.triton.running() and self.proxy is not None and self.proxy.running()

    @property
    def pid(self) -> int | None:
        return self.triton.pid

    @property
    def proxy_pid(self) -> int | None:
        return self.proxy.proc.pid if self.proxy and self.proxy.proc else None

    def start(self) -> "ProxiedServer":
        if self.running():
            return self
        try:
            self.triton.start()
            self._workdir = Path(tempfile.mkdtemp(prefix="diffgap-nginx-"))
            os.chmod(self._workdir, 0o711)  # unprivileged workers reach the temp paths nginx creates for them
            # a fresh prefix per attempt: a failed attempt's error log must not speak for the next one
            prefixes = (self._workdir / f"nginx-{i}" for i in itertools.count())

            def launch(ports: tuple[int, ...]) -> None:
                self.proxy = NginxProxy(ProxyPorts(self.host, *ports), self.triton.endpoints, self.limits, next(prefixes))
                try:
                    self.proxy.start()
                except PortInUse:
                    self.proxy.stop()
                    raise

            start_on_free_ports(launch, self._ports, lambda: free_port(self.host), "nginx")
            log.info("proxy ready (nginx pid %d) on %s: %s", self.proxy_pid, self.host, self.limits.describe())
            return self
        except BaseException:
            self.stop()
            raise

    def wait(self, poll_s: float = 0.5) -> str:
        """Block until tritonserver or nginx exits on its own; say which, with its exit code."""
        while True:
            if self.triton.proc is None or self.triton.proc.poll() is not None:
                code = self.triton.proc.returncode if self.triton.proc else None
                return f"tritonserver exited on its own with code {code}"
            if self.proxy is None or self.proxy.proc is None or self.proxy.proc.poll() is not None:
                code = self.proxy.proc.returncode if self.proxy and self.proxy.proc else None
                return f"nginx exited on its own with code {code} (log {self.proxy.error_log if self.proxy else '-'})"
            time.sleep(poll_s)

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        self.triton.stop()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> "ProxiedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- endpoints and clients -------------------------------------------------------------
    def _public(self) -> ProxyPorts:
        if self.proxy is None or not self.proxy.running():
            raise RuntimeError("the proxied server is not running; call start() or use `with ProxiedServer(...)`")
        return self.proxy.public

    def _client_host(self) -> str:
        h = self._public().host
        return LOOPBACK if h in ("0.0.0.0", "", "::") else h

    @property
    def http_url(self) -> str:
        return _listen(self._client_host(), self._public().http_port)

    @property
    def grpc_url(self) -> str:
        return _listen(self._client_host(), self._public().grpc_port)

    @property
    def metrics_url(self) -> str:
        return f"http://{_listen(self._client_host(), self._public().metrics_port)}/metrics"

    @property
    def upstream(self) -> Endpoints:
        """tritonserver's own (loopback) endpoints, behind the proxy."""
        return self.triton.endpoints

    def http_client(self, **kw):
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.http_url, **kw)
        self.triton._clients.append(client)  # closed on stop(): open connections delay Triton's exit
        return client

    def grpc_client(self, **kw):
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.grpc_url, **kw)
        self.triton._clients.append(client)
        return client

    def log_tail(self, lines: int = 30) -> str:
        return self.triton.log_tail(lines)

    @property
    def log_path(self) -> Path:
        return self.triton.log_path
