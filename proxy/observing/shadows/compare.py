"""Comparing a shadow's answer with production's, off the critical path.

KServe V2 ``ModelInfer`` answers are decoded (raw and typed contents, every datatype) and compared output by output,
matched by name; outputs only the shadow returns are ignored (a new model may add some). Any other method's answers
are compared as bytes. A shadow answer that cannot be compared — undecodable, a production output missing, another
datatype or shape — is a comparison *error* with a reason, and counts as disagreement.

Definitions (``p`` production, ``s`` shadow, element-wise, in float64):

- match: ``|s - p| <= atol + rtol * |p|`` with ``p`` finite, or both NaN, or equal (so ``inf`` matches only
  ``inf``); BYTES elements match when equal. A call *matches* when every production output matches in every element.
- error statistics over the numeric elements whose difference is finite: ``abs_sum = sum |s - p|``,
  ``sq_sum = sum (s - p)^2``, ``abs_max = max |s - p|`` and ``elements``; MAE = abs_sum / elements and
  RMSE = sqrt(sq_sum / elements) over a window.
- agreement samples: ``none`` — one per call, agreeing when the call matches; ``argmax`` — one per row of the
  classification output (its first dimension; a rank-1 tensor is one row), agreeing when ``argmax`` over the rest is
  equal; ``label`` — one per element of the classification output, agreeing when equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mlmirror.config import Compare
from mlmirror.kernels.agreement import argmax_agreement, differences, warm_up
from mlmirror.protocol.kserve import Tensor, TensorError, response_outputs
from mlmirror.protocol.names import MODEL_INFER

__all__ = ["Comparator", "Comparison", "ProductionAnswer"]


@dataclass(frozen=True, slots=True)
class Comparison:
    """One shadow answer against production's. ``error`` is the reason when they could not be compared."""

    matched: bool
    agree: int
    samples: int
    abs_sum: float = 0.0
    sq_sum: float = 0.0
    abs_max: float = 0.0
    elements: int = 0
    error: str | None = None


class ProductionAnswer:
    """Production's answer to one call, decoded at most once however many shadows compare against it."""

    __slots__ = ("_decoded", "data", "method")

    def __init__(self, method: str, data: bytes) -> None:
        self.method = method
        self.data = data
        self._decoded: list[Tensor] | TensorError | None = None

    def outputs(self) -> list[Tensor]:
        """Production's output tensors; raises ``TensorError`` (reason prefixed ``production_``)."""
        if self._decoded is None:
            try:
                self._decoded = response_outputs(self.data)[1]
            except TensorError as exc:
                self._decoded = TensorError(f"production_{exc.reason}", str(exc))
        if isinstance(self._decoded, TensorError):
            raise self._decoded
        return self._decoded


class Comparator:
    """Compares answers by a route's ``compare`` settings."""

    def __init__(self, spec: Compare) -> None:
        self.spec = spec
        warm_up()  # compile the kernels now (at start-up or a reload), not on the first copy's answer

    def compare(self, production: ProductionAnswer, shadow: bytes) -> Comparison:
        """The shadow's serialized answer against production's."""
        if production.method != MODEL_INFER:
            equal = production.data == shadow
            return Comparison(matched=equal, agree=int(equal), samples=1)
        try:
            outputs: list[Tensor] | TensorError = response_outputs(shadow)[1]
        except TensorError as exc:
            outputs = exc
        return self.compare_outputs(production, outputs)

    def compare_outputs(self, production: ProductionAnswer, shadow: list[Tensor] | TensorError) -> Comparison:
        """The shadow's decoded ``ModelInfer`` outputs (or why they could not be had) against production's."""
        try:
            outputs = production.outputs()
        except TensorError as exc:
            return Comparison(matched=False, agree=0, samples=0, error=exc.reason)
        try:
            if isinstance(shadow, TensorError):
                raise shadow
            return self._compare_tensors(outputs, shadow)
        except TensorError as exc:
            return Comparison(matched=False, agree=0, samples=self._samples_of(outputs), error=exc.reason)

    def _compare_tensors(self, production: list[Tensor], shadow: list[Tensor]) -> Comparison:
        by_name = {tensor.name: tensor for tensor in shadow}
        matched = True
        abs_sum = sq_sum = abs_max = 0.0
        elements = 0
        for p in production:
            s = by_name.get(p.name)
            if s is None:
                raise TensorError("missing_output", f"the shadow returned no output {p.name!r}")
            if s.datatype != p.datatype:
                raise TensorError("dtype_mismatch", f"output {p.name!r}: {s.datatype}, production {p.datatype}")
            if s.shape != p.shape:
                raise TensorError("shape_mismatch", f"output {p.name!r}: {list(s.shape)}, production {list(p.shape)}")
            if p.datatype == "BYTES":
                matched = matched and bool(np.all(p.values == s.values))
                continue
            close, stats = self._numeric(p.values, s.values)
            matched = matched and close
            if stats[3]:
                abs_sum += stats[0]
                sq_sum += stats[1]
                abs_max = max(abs_max, stats[2])
                elements += stats[3]
        if self.spec.classification == "none":
            agree, samples = int(matched), 1
        else:
            target = self._classification_output(production)
            agree, samples = self._agreement(target, by_name[target.name])
        return Comparison(matched, agree, samples, abs_sum, sq_sum, abs_max, elements)

    def _numeric(self, production: np.ndarray, shadow: np.ndarray) -> tuple[bool, tuple[float, float, float, int]]:
        """(every element matches, (abs_sum, sq_sum, abs_max, elements) over finite differences)."""
        return differences(production, shadow, self.spec.atol, self.spec.rtol)

    def _classification_output(self, production: list[Tensor]) -> Tensor:
        if not production:
            raise TensorError("missing_output", "production returned no output to classify")
        if self.spec.output is None:
            return production[0]
        for tensor in production:
            if tensor.name == self.spec.output:
                return tensor
        raise TensorError("missing_output", f"production returned no output {self.spec.output!r}")

    def _agreement(self, p: Tensor, s: Tensor) -> tuple[int, int]:
        samples = self._samples_in(p)
        if self.spec.classification == "label":
            return int(np.count_nonzero(p.values.ravel() == s.values.ravel())), samples
        if p.datatype == "BYTES":
            raise TensorError("not_numeric", f"output {p.name!r} is BYTES: argmax needs numbers")
        if samples == 0:
            return 0, 0
        return argmax_agreement(p.values.reshape(samples, -1), s.values.reshape(samples, -1)), samples

    def _samples_in(self, target: Tensor) -> int:
        """Agreement samples in a classification output: its elements (label) or its rows (argmax)."""
        if self.spec.classification == "label" or target.values.size == 0:
            return int(target.values.size)
        return target.shape[0] if len(target.shape) >= 2 else 1

    def _samples_of(self, production: list[Tensor]) -> int:
        """Agreement samples a call carries: what an incomparable shadow answer loses."""
        if self.spec.classification == "none":
            return 1
        try:
            return self._samples_in(self._classification_output(production))
        except TensorError:
            return 1
