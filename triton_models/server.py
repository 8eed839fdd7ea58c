"""Start and stop the tritonserver bundled in nvidia-pytriton (server 2.51.0, python backend only).

Recipe (verified on a CPU-only machine):

- a private copy of pytriton's ``tritonserver`` folder, with the python backend stub built for the
  running interpreter copied into ``backends/python/`` (site-packages is never mutated);
- ``LD_LIBRARY_PATH`` gets ``nvidia_pytriton.libs`` (the copied binaries lose their ``$ORIGIN`` rpath)
  and this interpreter's ``LIBDIR`` (the stub links ``libpython3.X``);
- this virtualenv's ``bin/`` first on ``PATH``: the stub imports numpy/onnxruntime/diffgap through
  the first ``python3`` it finds;
- loopback binding only, on free ports, ``--model-control-mode=none``, ``--allow-gpu-metrics=false``
  (clients on other machines go through :mod:`.proxy`, which limits request sizes; this release of
  tritonserver has none and dies on a single HTTP body over 2 GiB);
- ready when tritonclient's ``is_server_ready`` and ``is_model_ready`` (every model) say so
  (:mod:`.lifecycle`); stopped by SIGTERM to the PID we started, then SIGKILL if it has not exited
  within the grace period.

:class:`TritonServer` is a context manager that always stops the server (tests, demo, benchmarks).
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from .lifecycle import PortInUse, start_on_free_ports, wait_until_ready

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_LIVE: "weakref.WeakSet[TritonServer]" = weakref.WeakSet()


@dataclass(frozen=True)
class Endpoints:
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int

    @property
    def http(self) -> str:
        """``host:port`` as tritonclient.http expects it (no scheme)."""
        return f"{self.host}:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"


def _pytriton_dist() -> tuple[Path, Path]:
    """(pytriton's tritonserver folder, its bundled shared-library folder)."""
    try:
        import pytriton
    except ImportError as e:
        raise FileNotFoundError(
            "nvidia-pytriton is not installed, so there is no tritonserver binary; "
            "`pip install -e .[serving]` (nvidia-pytriton==0.7.0)"
        ) from e
    root = Path(pytriton.__file__).parent
    dist, libs = root / "tritonserver", root.parent / "nvidia_pytriton.libs"
    if not (dist / "bin" / "tritonserver").exists():
        raise FileNotFoundError(f"{dist}/bin/tritonserver missing; reinstall nvidia-pytriton==0.7.0")
    return dist, libs


def prepare_server_dir(dest: Path) -> Path:
    """Copy the bundled server into ``dest`` with the python stub for this interpreter; return ``dest``."""
    dist, _ = _pytriton_dist()
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub.exists():
        raise FileNotFoundError(f"nvidia-pytriton has no python backend stub for Python {ver} ({stub}); use Python 3.8-3.13")
    shutil.copytree(dist, dest, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
    shutil.copy2(stub, dest / "backends" / "python" / "triton_python_backend_stub")
    return dest


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def server_env() -> dict[str, str]:
    """Environment for tritonserver and its python stubs (see module docstring for why)."""
    _, libs = _pytriton_dist()
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    ld = [str(libs)]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and Path(libdir).is_dir():
        ld.append(libdir)
    if env.get("LD_LIBRARY_PATH"):
        ld.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(ld)
    # The python models must not spin extra threads per instance on a small CPU box; ORT reads these.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # PR_SET_PDEATHSIG (1) = SIGTERM: a server never outlives a crashed/killed parent (pytest -x, kill -9).
    # Linux sends it when the *thread* that started the server ends: start servers from a thread that
    # outlives them (the main thread, as the CLI, tests and demo do).
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def check_repository(repo: Path) -> list[str]:
    """Names of the models in a Triton repository; a clear error when it is not one."""
    repo = Path(repo)
    if not repo.is_dir():
        raise FileNotFoundError(f"model repository {repo} does not exist; make one with `diffgap triton-repo EXPORT_DIR --out {repo}`")
    models = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    if not models:
        raise FileNotFoundError(f"{repo} holds no <model>/config.pbtxt; it is not a Triton model repository (make one with `diffgap triton-repo`)")
    return models


class TritonServer:
    """A tritonserver process serving ``repository``; use as a context manager.

    Ports left as ``None`` are picked free on ``host``. ``start()`` returns once the server reports
    ready (or raises with the tail of its log); ``stop()`` is idempotent and always runs on exit.
    """

    def __init__(
        self,
        repository: str | os.PathLike,
        host: str = LOOPBACK,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        startup_timeout: float = 180.0,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),  # more tritonserver flags
        log_path: str | os.PathLike | None = None,
        exit_timeout: int = 5,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        keep_log: bool = False,
    ) -> None:
        self.repository = Path(repository).resolve()
        self.models = check_repository(self.repository)
        self.host = host
        self._ports = (http_port, grpc_port, metrics_port)
        self.startup_timeout = startup_timeout
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args)
        self._user_log = Path(log_path) if log_path else None
        self._log_path: Path | None = None
        # Triton waits up to --exit-timeout-secs (default 30) for open client connections on SIGTERM.
        self.exit_timeout = exit_timeout
        self._clients: list = []
        self.extra_env = dict(env or {})
        # The python stubs put the working directory first on sys.path (they ignore PYTHONPATH).
        self.cwd = Path(cwd) if cwd else None
        self._workdir: Path | None = None
        self.keep_log = keep_log
        self._failed = False
        self._log_file = None
        self._log_offset = 0
        self.proc: subprocess.Popen | None = None
        self.endpoints: Endpoints | None = None
        if host not in (LOOPBACK, "localhost", "::1"):
            # tritonserver 2.51 has no request-size option and one HTTP body over 2 GiB crashes it.
            raise ValueError(
                f"tritonserver binds loopback only, not {host}: it has no request-size limit, so other machines "
                f"reach it through the body-limiting proxy (diffgap.triton_models.proxy.ProxiedServer, "
                f"`diffgap serve --host {host}`)"
            )

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        if self._log_path is None:
            raise RuntimeError("server not started")
        return self._log_path

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _command(self, ep: Endpoints, server_dir: Path) -> list[str]:
        return [
            str(server_dir / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            "--model-control-mode=none",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--backend-directory={server_dir / 'backends'}",
            f"--cache-directory={server_dir / 'caches'}",
            f"--http-address={ep.host}", f"--http-port={ep.http_port}",
            f"--grpc-address={ep.host}", f"--grpc-port={ep.grpc_port}",
            f"--metrics-address={ep.host}", f"--metrics-port={ep.metrics_port}",
            "--allow-gpu-metrics=false",
            f"--exit-timeout-secs={self.exit_timeout}",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]

    def start(self) -> "TritonServer":
        if self.running():
            return self
        self._workdir = Path(tempfile.mkdtemp(prefix="diffgap-tritonserver-"))
        try:
            server_dir = prepare_server_dir(self._workdir / "tritonserver")
            self._log_path = self._user_log or self._workdir / "tritonserver.log"
            self._failed = False

            def launch(ports: tuple[int, ...]) -> None:
                ep = Endpoints(self.host, *ports)
                self._launch(self._command(ep, server_dir))
                try:
                    self._wait_ready(ep)
                except PortInUse:
                    self._terminate()
                    raise
                self.endpoints = ep

            start_on_free_ports(launch, self._ports, lambda: free_port(self.host), "tritonserver")
            _LIVE.add(self)
            log.info("tritonserver ready (pid %d): http %s grpc %s", self.proc.pid, self.endpoints.http, self.endpoints.grpc)
            return self
        except BaseException:
            self._failed = True
            self.stop()
            raise

    def _launch(self, cmd: list[str]) -> None:
        log.debug("starting %s", " ".join(cmd))
        self._log_file = open(self.log_path, "ab")
        self._log_offset = self._log_file.tell()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**server_env(), **self.extra_env}, cwd=self.cwd or self._workdir,
            # Own session: Ctrl-C in a terminal reaches only us; we stop the server in order.
            start_new_session=True, preexec_fn=_die_with_parent,
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, RuntimeError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_errors(self, limit: int = 20) -> str:
        """Triton's error lines (``E<date> ...``, e.g. a model that failed to load) and its last line."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except (OSError, RuntimeError):
            return ""
        errors = [l for l in lines if len(l) > 1 and l[0] == "E" and l[1:5].isdigit()][:limit]
        last = next((l for l in reversed(lines) if l.strip()), "")
        return "\n".join([*errors, *([last] if last not in errors else [])])

    def _attempt_log(self) -> str:
        """What the current launch wrote to the log (an earlier attempt's lines do not count)."""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            return f.read().decode(errors="replace")

    def _exit_error(self) -> Exception:
        # Triton 2.51: "failed to start HTTP service: Unavailable - Socket '...' already in use"
        if "already in use" in self._attempt_log():
            return PortInUse(f"a port is already in use; log {self.log_path}")
        return RuntimeError(
            f"tritonserver exited with code {self.proc.returncode} before becoming ready "
            f"(repository {self.repository}; full log {self.log_path}); errors:\n{self.log_errors()}"
        )

    def _wait_ready(self, ep: Endpoints) -> None:
        probe = LOOPBACK if ep.host in ("0.0.0.0", "") else ep.host
        wait_until_ready(
            self.proc, f"{probe}:{ep.http_port}", "tritonserver", self.startup_timeout, models=self.models,
            exited=self._exit_error,
            detail=lambda: f"repository {self.repository}; last log lines:\n{self.log_tail()}",
        )

    def _terminate(self, grace: float = 30.0) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver (pid %d) ignored SIGTERM for %.0fs; killing it", proc.pid, grace)
                proc.kill()
                proc.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self, grace: float = 30.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``grace`` s) and remove the private copy.

        The log in the private directory is removed too, unless ``keep_log`` was asked for or the
        server failed (it did not start, or exited on its own with an error): then it is kept for a
        post-mortem and its path logged.
        """
        if self.proc is not None and self.proc.poll() not in (None, 0):
            self._failed = True
        self._terminate(grace)
        _LIVE.discard(self)
        self.endpoints = None
        if self._workdir is None:
            return
        shutil.rmtree(self._workdir / "tritonserver", ignore_errors=True)
        log_inside = self._log_path is not None and self._log_path.is_relative_to(self._workdir)
        if log_inside and (self.keep_log or self._failed):
            if self._failed:
                log.warning("tritonserver log kept at %s", self._log_path)
        else:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- clients ---------------------------------------------------------------------------
    def _ep(self) -> Endpoints:
        if self.endpoints is None:
            raise RuntimeError("tritonserver is not running; call start() or use `with TritonServer(...)`")
        return self.endpoints

    def _client_host(self) -> str:
        return LOOPBACK if self._ep().host in ("0.0.0.0", "") else self._ep().host

    @property
    def http_url(self) -> str:
        return f"{self._client_host()}:{self._ep().http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host()}:{self._ep().grpc_port}"

    def http_client(self, **kw):
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.http_url, **kw)
        self._clients.append(client)  # closed on stop(): open connections delay Triton's exit
        return client

    def grpc_client(self, **kw):
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.grpc_url, **kw)
        self._clients.append(client)
        return client


@contextlib.contextmanager
def serve(repository: str | os.PathLike, **kw) -> Iterator[TritonServer]:
    """``with serve(repo) as server:`` — started, ready, and always stopped."""
    server = TritonServer(repository, **kw)
    with server:
        yield server


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop(grace=10)
