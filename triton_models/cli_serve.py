"""``diffgap serve [REPO]``: tritonserver behind a body-limiting nginx proxy, until Ctrl-C / SIGTERM.

tritonserver (the release bundled in nvidia-pytriton) binds loopback only; nginx listens on
``--host`` with the public HTTP, gRPC and metrics ports and refuses any request larger than the
repository's largest legal request (see :mod:`diffgap.triton_models.proxy`).
"""
from __future__ import annotations

import argparse
import signal
import sys

HELP = "serve a Triton model repository: the bundled tritonserver on loopback behind a body-limiting nginx proxy"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo", nargs="?", default="triton_repo", help="model repository (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the proxy listens on (default: loopback; anything else is reachable from other "
                        "machines, with no authentication). tritonserver itself always binds 127.0.0.1")
    p.add_argument("--http-port", type=int, default=0, help="public HTTP port of the proxy; 0 = a free port (default)")
    p.add_argument("--grpc-port", type=int, default=0, help="public gRPC port of the proxy; 0 = a free port (default)")
    p.add_argument("--metrics-port", type=int, default=0, help="public metrics port of the proxy; 0 = a free port (default)")
    p.add_argument("--max-body-size", type=int, default=None, metavar="BYTES",
                   help="request body limit for both protocols (default: computed from the repository's "
                        "declarations: its largest legal request plus headroom)")
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for readiness (default: %(default)s)")
    p.add_argument("--log-file", help="tritonserver log file (default: a temporary file, printed at start)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")


# Installed by `run` itself: a process started without job control (a background job of a script,
# some supervisors) inherits SIGINT as ignored, and Python then never raises KeyboardInterrupt.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):  # noqa: ARG001
    raise _Stop(signal.Signals(signum).name)


def run(args: argparse.Namespace) -> int:
    from .proxy import ProxiedServer
    from .repository import check_servable_by_bundled_server

    check_servable_by_bundled_server(args.repo)  # a gpu-flavour repository: one-line error, exit 2
    # Not a repository, nginx missing, no computable limit: the CLI prints the one-line error (exit 2).
    # ProxiedServer logs a warning when --host is not loopback (no authentication on these endpoints).
    server = ProxiedServer(
        args.repo, host=args.host, http_port=args.http_port or None, grpc_port=args.grpc_port or None,
        metrics_port=args.metrics_port or None, max_body_size=args.max_body_size,
        startup_timeout=args.startup_timeout, log_verbose=args.log_verbose, log_path=args.log_file, keep_log=True,
    )
    previous = {sig: signal.signal(sig, _raise_stop) for sig in STOP_SIGNALS}
    try:
        server.start()
        up = server.upstream
        print(f"tritonserver ready (pid {server.pid}), serving {len(server.models)} models from {server.repository}")
        print(f"proxy ready (nginx pid {server.proxy_pid}) on {args.host}; tritonserver itself on {up.host} only")
        print(f"  HTTP     {server.http_url}   (e.g. curl http://{server.http_url}/v2/health/ready)")
        print(f"  gRPC     {server.grpc_url}")
        print(f"  metrics  {server.metrics_url}")
        print(f"  limits   {server.limits.describe()}")
        print(f"  log      {server.log_path}")
        print("Ctrl-C or SIGTERM stops it.", flush=True)
        code = server.wait()
        print(f"diffgap serve: error: {code}; last tritonserver log lines:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except _Stop as stop:
        print(f"{stop}: stopping tritonserver and the proxy ...", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"diffgap serve: error: {e}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C while stopping must not cut the shutdown short and leave the children running.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        server.stop()  # nginx, then tritonserver: each signalled and waited for (reaped)
        if not server.running():
            print("tritonserver stopped", flush=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
