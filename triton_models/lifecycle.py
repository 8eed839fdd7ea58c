"""What tritonserver and the nginx proxy share at start-up: readiness and the free-port retry.

- :func:`wait_until_ready`: polls Triton's KServe v2 readiness through tritonclient
  (``is_server_ready``, then ``is_model_ready`` per model); the proxy passes ``/v2/health/ready``
  through unchanged, so the same call tells when nginx forwards to a ready tritonserver.
- :func:`start_on_free_ports`: a port picked free can be taken by another process between the pick
  and the child's bind; the child then exits saying so (:class:`PortInUse`) and fresh ports are
  picked. Ports the caller chose are tried once (another try would fail the same way).
"""
from __future__ import annotations

import contextlib
import logging
import subprocess
import time
from typing import Callable, Sequence

log = logging.getLogger(__name__)

PORT_ATTEMPTS = 3


class PortInUse(RuntimeError):
    """The child exited at start-up because one of its ports was already bound."""


def start_on_free_ports(
    launch: Callable[[tuple[int, ...]], None], requested: Sequence[int | None], pick: Callable[[], int], what: str,
) -> tuple[int, ...]:
    """Call ``launch(ports)`` with each unset (``None`` or 0) port of ``requested`` picked by ``pick()``;
    return the ports used.

    ``launch`` starts the child and waits for it to be ready; it raises :class:`PortInUse` (having
    stopped the child) when a port was taken.
    """
    attempts = 1 if any(requested) else PORT_ATTEMPTS
    for attempt in range(1, attempts + 1):
        ports = tuple(p or pick() for p in requested)
        try:
            launch(ports)
            return ports
        except PortInUse as e:
            if attempt == attempts:
                raise RuntimeError(f"{what} could not bind its ports {ports} ({e})") from None
            log.info("%s: a picked port was taken (%s); picking again", what, e)
    raise AssertionError("unreachable")


def wait_until_ready(
    proc: subprocess.Popen, url: str, what: str, timeout: float, *,
    exited: Callable[[], Exception], detail: Callable[[], str], models: Sequence[str] = (), poll_s: float = 0.2,
) -> None:
    """Return once the server at ``url`` (``host:port``) and each of ``models`` report ready.

    Raises ``exited()`` when ``proc`` ends first, and :class:`TimeoutError` (with ``detail()``, e.g.
    the log's last lines) after ``timeout`` seconds.
    """
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url, connection_timeout=2.0, network_timeout=2.0)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise exited()
            # Not listening yet (OSError: refused, reset, timed out) or answering not-ready (False).
            with contextlib.suppress(OSError, InferenceServerException):
                if client.is_server_ready() and all(client.is_model_ready(m) for m in models):
                    return
            time.sleep(poll_s)
    finally:
        client.close()
    raise TimeoutError(f"{what} not ready at {url} after {timeout:.0f}s; {detail()}")
