"""``diffgap serve [REPO]``: run the bundled tritonserver on a model repository until Ctrl-C / SIGTERM."""
from __future__ import annotations

import argparse
import signal
import sys

HELP = "serve a Triton model repository with the tritonserver bundled in nvidia-pytriton"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo", nargs="?", default="triton_repo", help="model repository (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind HTTP/gRPC/metrics to (default: loopback; anything else is reachable "
                        "from other machines, with no authentication)")
    p.add_argument("--http-port", type=int, default=0, help="0 = a free port (default)")
    p.add_argument("--grpc-port", type=int, default=0, help="0 = a free port (default)")
    p.add_argument("--metrics-port", type=int, default=0, help="0 = a free port (default)")
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for readiness (default: %(default)s)")
    p.add_argument("--log-file", help="tritonserver log file (default: a temporary file, printed at start)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):  # noqa: ARG001
    raise _Stop()


def run(args: argparse.Namespace) -> int:
    from .server import TritonServer

    # TritonServer logs a warning when --host is not loopback (no authentication on these endpoints).
    server = TritonServer(
        args.repo, host=args.host, http_port=args.http_port or None, grpc_port=args.grpc_port or None,
        metrics_port=args.metrics_port or None, startup_timeout=args.startup_timeout,
        log_verbose=args.log_verbose, log_path=args.log_file, keep_log=True,
    )
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        server.start()
        ep = server.endpoints
        print(f"tritonserver ready (pid {server.pid}), serving {len(server.models)} models from {server.repository}")
        print(f"  HTTP     {server.http_url}   (e.g. curl http://{server.http_url}/v2/health/ready)")
        print(f"  gRPC     {server.grpc_url}")
        print(f"  metrics  {ep.metrics}")
        print(f"  log      {server.log_path}")
        print("Ctrl-C or SIGTERM stops it.", flush=True)
        code = server.proc.wait()
        print(f"diffgap serve: error: tritonserver exited on its own with code {code}; last log lines:\n"
              f"{server.log_tail()}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop):
        print("stopping tritonserver ...", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"diffgap serve: error: {e}", file=sys.stderr)
        return 1
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
        if not server.running():
            print("tritonserver stopped", flush=True)
