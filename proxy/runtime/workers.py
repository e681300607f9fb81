"""A serving worker of ``mlmirror serve``: relays client calls and hands the answered calls of watched routes over.

The supervisor (proxy/runtime/supervisor.py) starts ``--workers N`` of these (default 1); they share the listener's
port (SO_REUSEPORT). Each relays calls as a lone proxy does, but makes no shadow copies and runs no drift engine:
the answered calls of watched routes go to the observing process (proxy/runtime/observer_process.py) over a Unix
socket (proxy/handoff/transport.py), batched and lossy, so a slow, hung or restarting observer costs a worker
counted drops, never a call. Feedback calls are relayed to the observer's listener. The worker's admin endpoint is
internal (loopback, any free port), for the supervisor. It stops on SIGTERM (draining its calls) or when the
supervisor goes away (its lifeline closes).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from mlmirror.config import load_config
from mlmirror.errors import ConfigError, StartError
from mlmirror.handoff.transport import HandoffSender
from mlmirror.metrics import Metrics
from mlmirror.runtime.children import announce, lifeline_closed
from mlmirror.runtime.observer_process import FEEDBACK_SOCKET, HANDOFF_SOCKET
from mlmirror.runtime.proxy import Proxy
from mlmirror.runtime.role import Role
from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["main", "run_worker"]

log = logging.getLogger(__name__)


class _SentCollector(Collector):
    """``mlmirror_handoff_sent_total``: answered calls written to the observing process's socket."""

    def __init__(self, sender: HandoffSender) -> None:
        self._sender = sender

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "mlmirror_handoff_sent", "Answered calls a worker handed to the observing process.", value=self._sender.sent
        )


async def run_worker(config_path: str, index: int, folder: Path, hello_fd: int, lifeline_fd: int) -> None:
    """One worker: a proxy on the shared port whose watched calls go to the observing process; stops on SIGTERM or
    when the supervisor goes away."""
    config = load_config(config_path)
    metrics = Metrics()
    dropped = Counter(
        "mlmirror_handoff_dropped", "Answered calls a worker could not hand to the hub, by reason.", ["reason"],
        registry=metrics.registry,
    )  # fmt: skip
    sender = HandoffSender(folder / HANDOFF_SOCKET, dropped)
    metrics.registry.register(_SentCollector(sender))
    role = Role("worker", admin="127.0.0.1:0", handoff=sender, feedback_target=f"unix:{folder / FEEDBACK_SOCKET}")
    proxy = Proxy(config, metrics=metrics, role=role)
    await proxy.start()
    loop = asyncio.get_running_loop()
    connection = loop.create_task(sender.keep_connected({"index": index, "pid": os.getpid()}))
    announce(hello_fd, pid=os.getpid(), admin_port=proxy.admin_port, grpc_port=proxy.grpc_port)

    orphaned = asyncio.Event()

    async def stop_when_the_supervisor_goes() -> None:
        await lifeline_closed(lifeline_fd)
        log.error("worker %d: the supervisor went away; stopping", index)
        orphaned.set()
        await proxy.stop()

    watcher = loop.create_task(stop_when_the_supervisor_goes())
    try:
        await proxy.run_until_signalled()
    finally:
        watcher.cancel()
        connection.cancel()
        await sender.close()
        if orphaned.is_set():
            shutil.rmtree(folder, ignore_errors=True)  # nobody else is left to remove the sockets


def main(argv: list[str] | None = None) -> int:
    """Entry point of a worker process (started by the supervisor, not by hand)."""
    from mlmirror.eventloop import run

    parser = argparse.ArgumentParser(
        prog="python -m mlmirror.runtime.workers", description="an mlmirror worker process"
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--folder", type=Path, required=True, help="the supervisor's socket folder")
    parser.add_argument("--hello-fd", type=int, required=True)
    parser.add_argument("--lifeline-fd", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s worker {args.index} %(levelname)s "
                        "%(name)s: %(message)s")  # fmt: skip
    try:
        run(
            run_worker(args.config, args.index, args.folder, args.hello_fd, args.lifeline_fd),
            use_uvloop=not args.no_uvloop,
        )
    except (StartError, ConfigError, OSError) as exc:
        log.error("worker %d cannot start: %s", args.index, exc)
        announce(args.hello_fd, error=str(exc))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
