"""nginx as the body-limiting reverse proxy in front of tritonserver: its config and its process.

:func:`nginx_config` renders the complete ``nginx.conf`` from the jinja2 template ``nginx.conf.j2``
next to this module (nothing from the system config is included):
HTTP/REST via ``proxy_pass``, gRPC via ``grpc_pass`` over cleartext HTTP/2, metrics, each with its
``client_max_body_size``, upstreams on 127.0.0.1 only. :class:`NginxProxy` runs it as our child
(``daemon off``) with a private prefix (temp paths, logs, pid file), checks it with ``nginx -t``
first, and stops it with SIGQUIT (graceful), then SIGKILL. Why and how it is used: :mod:`.proxy`.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from diffgap.core.errors import UserError
from diffgap.core.fsutil import atomic_write_text

from .lifecycle import PortInUse, wait_until_ready
from .limits import RequestLimits
from .server import LOOPBACK, Endpoints, _die_with_parent

log = logging.getLogger(__name__)

NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
INSTALL_HINT = "install nginx (`apt-get install nginx` on Debian/Ubuntu, or `make setup`)"
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


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def too_large_message(limit: int, protocol: str) -> str:
    return (f"request body larger than {limit} bytes, the largest legal {protocol} request of this model "
            f"repository; send fewer rows per request")


CONFIG_TEMPLATE = "nginx.conf.j2"


def _nginx_quote(s: str) -> str:
    """An nginx double-quoted string: backslashes and quotes escaped."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


@functools.lru_cache(maxsize=1)
def _template() -> "jinja2.Template":
    try:
        import jinja2
    except ImportError as e:
        raise ImportError("rendering the nginx config needs jinja2: `pip install -e .[serving]`") from e
    # StrictUndefined: a name missing from the render call is an error, never an empty directive.
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.filters["nginx_quote"] = _nginx_quote
    return env.from_string(resources.files(__package__).joinpath(CONFIG_TEMPLATE).read_text())


def _addresses(host: str, ports: ProxyPorts | Endpoints) -> dict[str, str]:
    """protocol -> ``host:port`` as nginx's ``listen``/``server`` directives read it."""
    return {proto: _listen(host, getattr(ports, f"{proto}_port")) for proto in ("http", "grpc", "metrics")}


def nginx_config(prefix: Path, public: ProxyPorts, upstream: Endpoints, limits: RequestLimits,
                 worker_processes: int | str = "auto") -> str:
    """The complete nginx.conf, rendered from ``nginx.conf.j2`` (no include of the system config:
    nothing else is served)."""
    if upstream.host != LOOPBACK:
        raise ValueError(f"the proxied tritonserver must bind {LOOPBACK}, not {upstream.host}")
    return _template().render(
        loopback=LOOPBACK, prefix=str(prefix), worker_processes=worker_processes,
        worker_user=" ".join(worker_user()) if os.geteuid() == 0 else None,
        public=_addresses(public.host, public), upstream=_addresses(LOOPBACK, upstream), limits=limits,
        upstream_timeout_s=UPSTREAM_TIMEOUT_S,
        http_too_large=too_large_message(limits.http_bytes, "HTTP"),
        grpc_too_large=too_large_message(limits.grpc_bytes, "gRPC"),
        grpc_resource_exhausted=GRPC_RESOURCE_EXHAUSTED, grpc_unavailable=GRPC_UNAVAILABLE,
    )


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
        for d in (self.prefix, self.prefix / "tmp"):  # unprivileged workers reach the temp paths nginx makes them
            os.chmod(d, 0o711)
        atomic_write_text(self.conf, nginx_config(self.prefix, self.public, self.upstream, self.limits))
        check = subprocess.run([str(nginx), "-t", "-q", "-p", str(self.prefix), "-c", str(self.conf)],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx rejected its generated config {self.conf}: {check.stderr.strip()}")
        with open(self.prefix / "nginx.stderr", "ab") as err:
            self.proc = subprocess.Popen(
                [str(nginx), "-p", str(self.prefix), "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                stdout=err, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
            )
        self._wait_ready()

    def _exit_error(self) -> Exception:
        text = self._log_tail() + (self.prefix / "nginx.stderr").read_text(errors="replace")
        if "Address already in use" in text:
            return PortInUse(text.strip().splitlines()[-1])
        return RuntimeError(f"nginx exited with code {self.proc.returncode} at start; log:\n{text.strip()}")

    def _wait_ready(self) -> None:
        # Triton's /v2/health/ready passes through: ready means nginx forwards to a ready tritonserver.
        probe = LOOPBACK if self.public.host in ("0.0.0.0", "", "::") else self.public.host
        wait_until_ready(self.proc, _listen(probe, self.public.http_port), "nginx proxy", self.startup_timeout,
                         exited=self._exit_error, detail=lambda: f"log:\n{self._log_tail()}", poll_s=0.1)

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
