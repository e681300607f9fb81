"""Checking that merging leaves a shadow's answers as they are: now and then, the first call of a merged request is
also sent alone, and the shadow's two answers to it are compared.

Merging is right only for a model that answers each row on its own (proxy/observing/shadows/batching.py). With
``batch_check: N`` (N > 0), the first merged request and every Nth one after it have their first call sent alone
as well. Merging stops for this shadow when the shadow answers that call alone but:

- its answer alone differs from the call's rows of the merged answer (other output names, datatypes or shapes;
  integers, booleans or bytes not equal; floats beyond ``RTOL`` and ``ATOL``): ``differ``;
- or the merged answer could not be cut into the calls' rows (``batch_split``): ``differ``;
- or the merged request failed with a code that says the shadow refused it (anything but ``UNREACHED``: say
  ``INVALID_ARGUMENT`` from a server whose batch limit is below the merged rows): ``refused``.

Later copies then go one per request, and the reason is kept (``/status``) and logged once. A check whose copy
fails (an error from the shadow, an answer that does not decode) decides nothing and is counted ``failed``. The
copies sent alone for a check are not counted as mirrored calls: each call is counted once, as part of its merged
request.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
import numpy as np
from mlmirror.protocol.kserve import Tensor, TensorError, response_outputs

__all__ = ["ATOL", "CHECK_RESULTS", "RTOL", "UNREACHED", "MergeCheck", "difference"]

log = logging.getLogger(__name__)

#: How far a float output may move when its row is answered within a merged request (numpy ``allclose``): a batch
#: may sum in another order, never more.
RTOL = 1e-4
ATOL = 1e-6
#: What a check found: the same answer, a different one, a merged request the shadow refused, or nothing (the copy
#: alone failed).
CHECK_RESULTS = ("same", "differ", "refused", "failed")
#: Codes of a merged request that say nothing about merging (the shadow is down, hung or going away): not checked.
UNREACHED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})


def difference(merged: Sequence[Tensor], alone: Sequence[Tensor]) -> str | None:
    """Why a call's rows of a merged answer (``merged``) differ from its answer alone, or None when they agree."""
    names = [t.name for t in alone]
    if [t.name for t in merged] != names:
        return f"outputs {names} alone, {[t.name for t in merged]} merged"
    for part, own in zip(merged, alone, strict=True):
        if (part.datatype, part.shape) != (own.datatype, own.shape):
            alone_is, merged_is = f"{own.datatype} {list(own.shape)}", f"{part.datatype} {list(part.shape)}"
            return f"output {own.name!r}: {alone_is} alone, {merged_is} merged"
        if own.values.dtype.kind in "fc":
            same = np.allclose(part.values, own.values, rtol=RTOL, atol=ATOL, equal_nan=True)
        else:
            same = np.array_equal(part.values, own.values)
        if not same:
            return f"output {own.name!r}: its values differ when the call is merged with others"
    return None


class MergeCheck:
    """One shadow's checks: due every ``every`` merged requests (0: never), counted by result; ``off`` is why
    merging stopped (None while it goes on)."""

    __slots__ = ("counts", "every", "off")

    def __init__(self, every: int) -> None:
        self.every = every
        self.counts = dict.fromkeys(CHECK_RESULTS, 0)
        self.off: str | None = None

    def due(self, number: int) -> bool:
        """Whether merged request ``number`` (1 for the first) has its first call checked."""
        return self.every > 0 and self.off is None and (number - 1) % self.every == 0

    def judge(
        self, merged: Sequence[Tensor] | TensorError | grpc.StatusCode, answer: bytes | None, shadow: str, route: str
    ) -> None:
        """Count a check. ``merged``: the call's rows of the merged answer, or why the answer could not be cut, or
        the code of the merged request that failed; ``answer``: the shadow's answer to the call alone (None: that
        copy failed)."""
        if answer is None:
            self.counts["failed"] += 1
            return
        try:
            alone = response_outputs(answer)[1]
        except TensorError:
            self.counts["failed"] += 1
            return
        reason: str | None
        if isinstance(merged, grpc.StatusCode):
            result, reason = "refused", f"the shadow failed a merged request ({merged.name}) and answers a call alone"
        elif isinstance(merged, TensorError):
            result, reason = "differ", f"a merged answer could not be cut into the calls' rows ({merged})"
        else:
            result, reason = "differ", difference(merged, alone)
        if reason is None:
            self.counts["same"] += 1
            return
        self.counts[result] += 1
        if self.off is None:
            self.off = reason
            log.warning("shadow %s of route %s: merging stopped, each copy now goes alone: %s", shadow, route, reason)
