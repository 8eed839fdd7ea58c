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

The config is written atomically into a private directory with its own temp paths, logs and pid
file; nginx runs in the foreground as our child (``daemon off``), is checked with ``nginx -t`` first,
and is stopped by SIGQUIT (graceful) to the PID we started, then SIGKILL after a grace period.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from diffgap.core.errors import UserError
from diffgap.core.fsutil import atomic_write_text

from .limits import RequestLimits, request_limits
from .server import LOOPBACK, Endpoints, TritonServer, free_port

log = logging.getLogger(__name__)

NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
INSTALL_HINT = "install nginx (`apt-get install nginx-light` on Debian/Ubuntu, or `make setup`)"
GRPC_RESOURCE_EXHAUSTED, GRPC_UNAVAILABLE = 8, 14
# An inference under heavy load may queue for a while; nginx's default of 60 s is too short for
# large batches on CPU.
UPSTREAM_TIMEOUT_S = 300


def find_nginx() -> Path:
    found = shutil.which("nginx") or next((c for c in NGINX_CANDIDATES if os.access(c, os.X_OK)), None)
    if not found:
        raise UserError(f"nginx not found; it is the body-size-limiting proxy in front of tritonserver: {INSTALL_HINT}")
    return Path(found)


def worker_user() -> tuple[str, str]:
    """(user, group) nginx workers drop to when started as root: never root itself."""
    import grp
    import pwd

    for name in ("www-data", "nobody"):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return name, grp.getgrgid(pw.pw_gid).gr_name
    raise UserError("neither user www-data nor nobody exists for nginx's worker processes; create one (`useradd -r www-data`)")


@dataclass(frozen=True)
class ProxyPorts:
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def too_large_message(limit: int, protocol: str) -> str:
    return (f"request body larger than {limit} bytes, the largest legal {protocol} request of this model "
            f"repository; send fewer rows per request")


def nginx_config(prefix: Path, public: ProxyPorts, upstream: Endpoints, limits: RequestLimits,
                 worker_processes: int | str = "auto") -> str:
    """The complete nginx.conf (no include of the system config: nothing else is served)."""
    if upstream.host != LOOPBACK:
        raise ValueError(f"the proxied tritonserver must bind {LOOPBACK}, not {upstream.host}")
    p = prefix
    http_msg = too_large_message(limits.http_bytes, "HTTP")
    grpc_msg = too_large_message(limits.grpc_bytes, "gRPC")
    user = f"user {' '.join(worker_user())};\n" if os.geteuid() == 0 else ""
    return f"""# generated by diffgap serve: nginx in front of tritonserver (which binds {LOOPBACK} only)
{user}worker_processes {worker_processes};
daemon off;
pid {p / 'nginx.pid'};
error_log {p / 'error.log'} warn;
events {{ worker_connections 4096; }}

http {{
    access_log off;
    client_body_temp_path {p / 'tmp' / 'body'};
    proxy_temp_path {p / 'tmp' / 'proxy'};
    fastcgi_temp_path {p / 'tmp' / 'fastcgi'};
    uwsgi_temp_path {p / 'tmp' / 'uwsgi'};
    scgi_temp_path {p / 'tmp' / 'scgi'};
    server_tokens off;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    client_body_buffer_size 4m;
    client_body_timeout 60s;

    upstream triton_http {{ server {_listen(LOOPBACK, upstream.http_port)}; keepalive 64; }}
    upstream triton_grpc {{ server {_listen(LOOPBACK, upstream.grpc_port)}; keepalive 64; }}

    server {{  # HTTP/REST
        listen {_listen(public.host, public.http_port)};
        client_max_body_size {limits.http_bytes};
        error_page 413 @too_large;
        error_page 502 504 @unavailable;  # nginx's own (tritonserver unreachable); Triton's statuses pass through
        location / {{
            proxy_pass http://triton_http;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering on;
            proxy_read_timeout {UPSTREAM_TIMEOUT_S}s;
            proxy_send_timeout {UPSTREAM_TIMEOUT_S}s;
        }}
        location @too_large {{
            default_type application/json;
            return 413 '{{"error":{_quote(http_msg)}}}';
        }}
        location @unavailable {{
            default_type application/json;
            return 502 '{{"error":"tritonserver is unavailable"}}';
        }}
    }}

    server {{  # gRPC over cleartext HTTP/2
        listen {_listen(public.host, public.grpc_port)} http2;
        client_max_body_size {limits.grpc_bytes};
        error_page 413 @grpc_too_large;
        error_page 502 503 504 @grpc_unavailable;
        location / {{
            grpc_pass grpc://triton_grpc;
            grpc_read_timeout {UPSTREAM_TIMEOUT_S}s;
            grpc_send_timeout {UPSTREAM_TIMEOUT_S}s;
        }}
        location @grpc_too_large {{
            default_type application/grpc;
            add_header grpc-status {GRPC_RESOURCE_EXHAUSTED} always;
            add_header grpc-message {_quote(grpc_msg.replace(' ', '%20'))} always;
            return 204;
        }}
        location @grpc_unavailable {{
            default_type application/grpc;
            add_header grpc-status {GRPC_UNAVAILABLE} always;
            add_header grpc-message "tritonserver%20is%20unavailable" always;
            return 204;
        }}
    }}

    server {{  # Prometheus metrics
        listen {_listen(public.host, public.metrics_port)};
        client_max_body_size 1k;
        location / {{ proxy_pass http://{_listen(LOOPBACK, upstream.metrics_port)}; }}
    }}
}}
"""


class NginxProxy:
    """nginx run as our child process with a private prefix directory."""

    def __init__(self, public: ProxyPorts, upstream: Endpoints, limits: RequestLimits, workdir: Path,
                 startup_timeout: float = 30.0) -> None:
        self.public, self.upstream, self.limits = public, upstream, limits
        self.prefix = Path(workdir)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.conf = self.prefix / "nginx.conf"

    @property
    def error_log(self) -> Path:
        return self.prefix / "error.log"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _log_tail(self, n: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.error_log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def start(self) -> None:
        nginx = find_nginx()
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.conf, nginx_config(self.prefix, self.public, self.upstream, self.limits))
        check = subprocess.run([str(nginx), "-t", "-q", "-p", str(self.prefix), "-c", str(self.conf)],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx rejected its generated config {self.conf}: {check.stderr.strip()}")
        from .server import _die_with_parent

        with open(self.prefix / "nginx.stderr", "ab") as err:
            self.proc = subprocess.Popen(
                [str(nginx), "-p", str(self.prefix), "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                stdout=err, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        probe = LOOPBACK if self.public.host in ("0.0.0.0", "", "::") else self.public.host
        url = f"http://{_listen(probe, self.public.http_port)}/v2/health/ready"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = self._log_tail() + (self.prefix / "nginx.stderr").read_text(errors="replace")
                if "Address already in use" in text:
                    raise _ProxyPortInUse(text.strip().splitlines()[-1])
                raise RuntimeError(f"nginx exited with code {self.proc.returncode} at start; log:\n{text.strip()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"nginx proxy not answering {url} after {self.startup_timeout:.0f}s; log:\n{self._log_tail()}")

    def stop(self, grace: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGQUIT)  # graceful: finish in-flight requests, then exit
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("nginx (pid %d) did not exit %.0fs after SIGQUIT; killing it", proc.pid, grace)
            proc.kill()
            proc.wait(timeout=10)


class _ProxyPortInUse(RuntimeError):
    pass


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
            attempts = 1 if any(self._ports) else 3
            for attempt in range(attempts):
                h, g, m = (p or free_port(self.host) for p in self._ports)
                self.proxy = NginxProxy(ProxyPorts(self.host, h, g, m), self.triton.endpoints, self.limits, self._workdir)
                try:
                    self.proxy.start()
                    break
                except _ProxyPortInUse as e:
                    self.proxy.stop()
                    if attempt == attempts - 1:
                        raise RuntimeError(f"nginx could not bind its ports: {e}") from None
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
