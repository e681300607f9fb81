"""Where a ``Proxy`` sits in ``mlmirror serve --workers N`` (proxy/runtime/supervisor.py). Alone (the default) it does
everything; the group splits the work:

- a **worker** serves clients on the shared port (SO_REUSEPORT) and relays calls, but makes no shadow copies and
  runs no drift engine: the answered calls of watched routes go to the hub through ``handoff``, and Feedback
  calls are relayed to the hub at ``feedback_target``. Its admin endpoint is internal (``admin``), for the hub.
- the **hub** takes the workers' calls and is the one place shadows are compared and drift is measured; its
  listener (``listen``, a Unix socket) serves only Feedback and health, and it starts no admin endpoint of its
  own: the supervisor's admin shows the hub's state merged with the workers'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlmirror.handoff.transport import HandoffSender

__all__ = ["ALONE", "Role"]


@dataclass(frozen=True, slots=True)
class Role:
    kind: str = "alone"  # alone | worker | hub
    listen: str | None = None  # replaces the config's listen address
    admin: str | None = None  # replaces the config's admin address (worker: an internal loopback port)
    handoff: HandoffSender | None = None  # worker: where watched routes' sampled answered calls go
    feedback_target: str | None = None  # worker: the hub's listener, for relayed Feedback calls
    intake: Callable[[], dict[str, object]] | None = None  # hub: how it takes the calls handed over, for /status
    wait_for_serving: Callable[[], None] | None = None  # hub: the drift thread's wait while serving is busy

    @property
    def worker(self) -> bool:
        return self.kind == "worker"

    @property
    def hub(self) -> bool:
        return self.kind == "hub"


ALONE = Role()
