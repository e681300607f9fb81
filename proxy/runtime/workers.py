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

import asyncio
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from mlmirror.handoff.transport import HandoffSender
from mlmirror.metrics import Metrics
from mlmirror.runtime.children import announce, child_parser, run_child, serve_child
from mlmirror.runtime.observer_process import FEEDBACK_SOCKET, HANDOFF_SOCKET
from mlmirror.runtime.promotion import replayed_config
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


async def run_worker(
    config_path: str,
    index: int,
    folder: Path,
    hello_fd: int,
    lifeline_fd: int,
    promotions: Sequence[Sequence[str]] = (),
) -> None:
    """One worker: a proxy on the shared port whose watched calls go to the observing process; stops on SIGTERM or
    when the supervisor goes away. ``promotions``: made since the config file was read (``--promote``)."""
    config = replayed_config(config_path, promotions)
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

    async def cleanup() -> None:
        connection.cancel()
        await sender.close()

    await serve_child(f"worker {index}", proxy.run_until_signalled, proxy.stop, lifeline_fd, folder, cleanup)


def main(argv: list[str] | None = None) -> int:
    """Entry point of a worker process (started by the supervisor, not by hand)."""
    parser = child_parser("mlmirror.runtime.workers", "an mlmirror worker process")
    parser.add_argument("--index", type=int, required=True)
    args = parser.parse_args(argv)
    return run_child(f"worker {args.index}", args, run_worker(args.config, args.index, args.folder, args.hello_fd,
                                                                args.lifeline_fd, args.promote))  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
