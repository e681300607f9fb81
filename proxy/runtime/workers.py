"""One worker process of ``mlmirror serve --workers N`` (started by the supervisor, proxy/runtime/supervisor.py):
``python -m mlmirror.runtime.workers --config FILE --index I --folder DIR [--promote ROUTE SHADOW]...``.

A proxy in the worker role (proxy/runtime/role.py) on the shared port: it relays calls, hands the answered calls of
watched routes to the hub over ``DIR/handoff.sock`` and relays Feedback calls to ``DIR/feedback.sock``. It stops by
itself when the hub goes away. ``--promote`` (repeated, in order) replays the promotions the group made since the
config file was last read, so a worker started again serves the same primaries as the others.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from mlmirror.config import Config, load_config
from mlmirror.errors import StartError
from mlmirror.handoff.transport import HandoffSender
from mlmirror.metrics import Metrics
from mlmirror.observing.shadows.promotion import PromotionError, promoted_config
from mlmirror.runtime.proxy import Proxy
from mlmirror.runtime.role import Role
from prometheus_client import Counter

__all__ = ["FEEDBACK_SOCKET", "HANDOFF_SOCKET", "main", "run_worker", "worker_config"]

log = logging.getLogger(__name__)

HANDOFF_SOCKET = "handoff.sock"
FEEDBACK_SOCKET = "feedback.sock"


def worker_config(config_path: str, promotions: Sequence[tuple[str, str]] = ()) -> Config:
    """The config file's configuration with ``promotions`` ((route, shadow), in order) applied. Raises
    ``StartError`` when one no longer applies (the file changed since)."""
    config = load_config(config_path)
    for route, shadow in promotions:
        try:
            config = promoted_config(config, route, shadow)
        except PromotionError as exc:
            raise StartError(f"cannot replay the promotion of {shadow} on route {route}: {exc}") from None
    return config


async def run_worker(config: Config, index: int, folder: Path) -> None:
    """One worker: a proxy on the shared port whose watched calls go to the hub; stops when the hub goes away."""
    metrics = Metrics()
    dropped = Counter(
        "mlmirror_handoff_dropped", "Answered calls a worker could not hand to the hub, by reason.", ["reason"],
        registry=metrics.registry,
    )  # fmt: skip
    sender = HandoffSender(folder / HANDOFF_SOCKET, dropped)
    await sender.connect()
    role = Role("worker", admin="127.0.0.1:0", handoff=sender, feedback_target=f"unix:{folder / FEEDBACK_SOCKET}")
    proxy = Proxy(config, metrics=metrics, role=role)
    await proxy.start()
    sender.hello(index=index, pid=os.getpid(), admin_port=proxy.admin_port, grpc_port=proxy.grpc_port)

    async def stop_when_the_hub_goes() -> None:
        await sender.hub_gone()
        log.error("worker %d: the hub went away; stopping", index)
        await proxy.stop()
        shutil.rmtree(folder, ignore_errors=True)  # the supervisor died: nobody else will remove its sockets

    watcher = asyncio.get_running_loop().create_task(stop_when_the_hub_goes())
    try:
        await proxy.run_until_signalled()
    finally:
        watcher.cancel()
        await sender.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of a worker process (started by the supervisor, not by hand)."""
    from mlmirror.eventloop import run

    parser = argparse.ArgumentParser(
        prog="python -m mlmirror.runtime.workers", description="an mlmirror worker process"
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--folder", type=Path, required=True, help="the supervisor's socket folder")
    parser.add_argument("--promote", nargs=2, action="append", default=[], metavar=("ROUTE", "SHADOW"),
                        help="a promotion the group made, replayed on the config file's configuration")  # fmt: skip
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s worker {args.index} %(levelname)s "
                        "%(name)s: %(message)s")  # fmt: skip
    try:
        config = worker_config(args.config, [tuple(pair) for pair in args.promote])
        run(run_worker(config, args.index, args.folder), use_uvloop=not args.no_uvloop)
    except (StartError, OSError) as exc:
        log.error("worker %d cannot start: %s", args.index, exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
