"""The release gate of a replay: a YAML file, read once into a frozen ``Gate``, every error located.

Keys (all optional; an empty or absent file is the defaults)::

    min_samples: 200          # the promotion keys, with the promotion defaults (proxy/config: Promotion)
    agreement: 0.98
    confidence: 0.95
    error_margin: 0.01
    latency_factor: 1.5
    compare: {atol: 1e-6, rtol: 1e-4, classification: none, output: NAME}   # a route's compare block
    drift: {method: ks, threshold: 0.01, bins: 10, outputs: [NAME, ...]}    # or: drift: off
    quality: {output: NAME, task: classification, metric: accuracy, margin: 0.01}

``drift.threshold`` defaults to the method's live default (``DRIFT_METHODS``). ``quality.metric``: ``accuracy``,
``precision``, ``recall`` or ``f1`` for classification (higher is better), ``mae`` or ``rmse`` for regression (lower
is better); ``quality.output`` defaults to ``compare.output``, else production's first output.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from mlmirror.config import CLASSIFICATION_MODES, DRIFT_METHODS, Compare, Promotion
from mlmirror.config.yamlsource import Located, parse_yaml, read_yaml_text

__all__ = ["QUALITY_METRICS", "DriftGate", "Gate", "QualityGate", "load_gate", "parse_gate"]

#: Quality metrics by task, and whether higher is better.
QUALITY_METRICS = {
    "classification": {"accuracy": True, "precision": True, "recall": True, "f1": True},
    "regression": {"mae": False, "rmse": False},
}
_DEFAULT_METRIC = {"classification": "accuracy", "regression": "rmse"}


@dataclass(frozen=True, slots=True, kw_only=True)
class DriftGate:
    """Prediction drift of the candidate's outputs against production's: an output series drifts when its
    ``method`` score is above ``threshold`` (below, for the p-values of ``ks`` and ``chi2``). ``bins``: quantile
    bins of production's outputs; ``outputs``: the output tensors watched (all when empty)."""

    method: str = "ks"
    threshold: float = DRIFT_METHODS["ks"]
    bins: int = 10
    outputs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class QualityGate:
    """Quality on the calls with outcomes: the candidate's ``metric`` may be worse than production's by at most
    ``margin`` (absolute)."""

    output: str | None = None
    task: str = "classification"
    metric: str = "accuracy"
    margin: float = 0.01

    @property
    def higher_is_better(self) -> bool:
        return QUALITY_METRICS[self.task][self.metric]


@dataclass(frozen=True, slots=True, kw_only=True)
class Gate:
    """Everything a replay is judged by; ``drift`` None: prediction drift is not gated."""

    promotion: Promotion = field(default_factory=Promotion)
    compare: Compare = field(default_factory=Compare)
    drift: DriftGate | None = field(default_factory=DriftGate)
    quality: QualityGate = field(default_factory=QualityGate)
    source: str = "<defaults>"


def load_gate(path: str | Path) -> Gate:
    """Read a gate file; raises ``ConfigError`` (``file:line: key: reason``)."""
    return parse_gate(read_yaml_text(path, "gate file"), str(path))


def parse_gate(text: str, file: str = "<string>") -> Gate:
    """Validate a gate given as YAML text; ``file`` names it in errors."""
    root = parse_yaml(text, file)
    keys = root.mapping(
        ("min_samples", "agreement", "confidence", "error_margin", "latency_factor", "compare", "drift", "quality")
    )
    promotion_readers = {
        "min_samples": lambda n: n.integer(minimum=1),
        "agreement": lambda n: n.number(minimum=0.0, maximum=1.0),
        "confidence": lambda n: n.number(minimum=0.5, maximum=0.9999),
        "error_margin": lambda n: n.number(minimum=0.0, maximum=1.0),
        "latency_factor": lambda n: n.number(minimum=0.01),
    }
    promotion = {name: read(keys[name]) for name, read in promotion_readers.items() if name in keys}
    compare = _compare(keys["compare"]) if "compare" in keys else Compare()
    drift = _drift(keys["drift"]) if "drift" in keys else DriftGate()
    quality = _quality(keys["quality"], compare) if "quality" in keys else QualityGate(output=compare.output)
    return Gate(promotion=Promotion(**promotion), compare=compare, drift=drift, quality=quality, source=file)


def _one_of(node: Located, choices: Collection[str], what: str) -> str:
    value = node.string()
    if value not in choices:
        raise node.error(f"unknown {what} {value!r} (one of {', '.join(choices)})")
    return value


def _compare(node: Located) -> Compare:
    keys = node.mapping(("atol", "rtol", "classification", "output"))
    values: dict[str, object] = {}
    for name in ("atol", "rtol"):
        if name in keys:
            values[name] = keys[name].number(minimum=0.0)
    if "classification" in keys:
        values["classification"] = _one_of(keys["classification"], CLASSIFICATION_MODES, "classification")
    if "output" in keys:
        values["output"] = keys["output"].string()
    return Compare(**values)  # type: ignore[arg-type]


def _drift(node: Located) -> DriftGate | None:
    if node.is_null() or (isinstance(node.node, yaml.ScalarNode) and node.scalar() in (False, "off")):
        return None
    keys = node.mapping(("method", "threshold", "bins", "outputs"))
    method = _one_of(keys["method"], DRIFT_METHODS, "drift method") if "method" in keys else "ks"
    threshold = DRIFT_METHODS[method]
    if "threshold" in keys:
        threshold = keys["threshold"].number(minimum=0.0, maximum=1.0 if method in ("ks", "chi2") else None)
    bins = keys["bins"].integer(minimum=1, maximum=1000) if "bins" in keys else 10
    outputs = tuple(item.string() for item in keys["outputs"].sequence()) if "outputs" in keys else ()
    return DriftGate(method=method, threshold=threshold, bins=bins, outputs=outputs)


def _quality(node: Located, compare: Compare) -> QualityGate:
    keys = node.mapping(("output", "task", "metric", "margin"))
    task = _one_of(keys["task"], QUALITY_METRICS, "task") if "task" in keys else "classification"
    metric = _one_of(keys["metric"], QUALITY_METRICS[task], f"{task} metric") if "metric" in keys else None
    return QualityGate(
        output=keys["output"].string() if "output" in keys else compare.output,
        task=task,
        metric=metric or _DEFAULT_METRIC[task],
        margin=keys["margin"].number(minimum=0.0) if "margin" in keys else 0.01,
    )
