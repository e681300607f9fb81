"""Reading a route's observers: ``drift`` (features, ground truth, attribution, multivariate), ``capture`` and
``redact``. Every error is located (``file:line: key: reason``).
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

from mlmirror.config.schema import MODEL_INFER, RouteMatch
from mlmirror.config.schema_observing import (
    DATA_QUALITY_CHECKS,
    DRIFT_METHODS,
    GROUND_TRUTH_TASKS,
    Attribution,
    Capture,
    Drift,
    DriftFeature,
    GroundTruth,
    Multivariate,
    Persistence,
)
from mlmirror.config.values import (
    Reader,
    existing_file,
    is_scalar,
    one_of,
    path_of,
    probe,
    read_section,
    schema_reader,
    shown,
)
from mlmirror.config.yamlsource import Located
from mlmirror.kernels.methods import DRIFT_METHODS as METHOD_REGISTRY

__all__ = ["read_capture", "read_drift", "read_redact"]


def read_drift(node: Located, base: Path) -> Drift:
    """A route's ``drift`` section; a relative ``profile`` is taken from ``base``."""

    def feature(item: Located) -> DriftFeature:
        values, _ = read_section(item, DriftFeature, required=("input",))
        default = values["input"] if values.get("column") is None else f"{values['input']}[{values['column']}]"
        return DriftFeature(**{"name": default, **values})

    def method(item: Located) -> str:
        return one_of(item, tuple(DRIFT_METHODS), "drift method")

    def thresholds(n: Located) -> MappingProxyType:
        given = {}
        for name, item in n.dictionary().items():
            if name not in DRIFT_METHODS:
                raise item.error(f"unknown drift method {name!r} (one of {', '.join(DRIFT_METHODS)})")
            given[name] = item.number(minimum=0.0, maximum=1.0 if METHOD_REGISTRY[name].p_value else None)
        return MappingProxyType({**DRIFT_METHODS, **given})

    def data_quality(n: Located) -> MappingProxyType:
        given = {}
        for name, item in n.dictionary().items():
            if name not in DATA_QUALITY_CHECKS:
                raise item.error(f"unknown data-quality check {name!r} (one of {', '.join(DATA_QUALITY_CHECKS)})")
            given[name] = item.number(minimum=0.0, maximum=1.0)
        return MappingProxyType({**DATA_QUALITY_CHECKS, **given})

    window = schema_reader(Drift, "window")
    readers: dict[str, Reader] = {  # the other keys are read as the schema declares them
        "features": lambda n: tuple(feature(item) for item in n.sequence()),
        "outputs": lambda n: tuple(item.string() for item in n.sequence()),
        "window": lambda n: None if n.is_null() else window(n),
        "export_bins": lambda n: tuple(item.string() for item in n.sequence()),
        "model_version": lambda n: str(n.scalar()),
        "profile": lambda n: existing_file(n, base),
        "methods": lambda n: tuple(method(item) for item in n.sequence()),
        "thresholds": thresholds,
        "data_quality": data_quality,
        "ground_truth": _ground_truth,
        "attribution": _attribution,
        "multivariate": _multivariate,
        "alarm_level": _alarm_level,
        "persistence": _persistence,
    }
    values, keys = read_section(node, Drift, readers)
    drift = Drift(**values)
    if drift.window is None and drift.window_time is None:
        raise keys["window"].error("a window needs a size (window) or a duration (window_time)")
    names = [f.name for f in drift.features]
    if len(set(names)) != len(names):
        raise keys["features"].error(f"feature names must be unique, got {names}")
    if drift.segment is not None and (drift.ground_truth is None or drift.ground_truth.task != "classification"):
        raise keys["segment"].error("segments need a classification ground_truth (its output is the prediction)")
    if drift.segment is not None and drift.features and drift.segment not in names:
        raise keys["segment"].error(f"segment {drift.segment!r} is not one of the features {names}")
    if drift.detect not in drift.methods:
        raise keys.get("detect", node).error(f"detect method {drift.detect!r} is not in methods {list(drift.methods)}")
    return drift


def _multivariate(node: Located) -> Multivariate | None:
    """``off`` disables it; else {variance, k}."""
    if node.is_null() or (is_scalar(node) and node.scalar() in (False, "off")):
        return None
    return Multivariate(**read_section(node, Multivariate)[0])


def _alarm_level(node: Located) -> float | None:
    """``off`` (or null): each series judged at its own threshold; else the family-wise level (0 is out of range)."""
    if node.is_null() or (is_scalar(node) and (node.scalar() is False or node.scalar() == "off")):
        return None
    return schema_reader(Drift, "alarm_level")(node)


def _persistence(node: Located) -> Persistence:
    values, keys = read_section(node, Persistence)
    persistence = Persistence(**values)
    if persistence.m > persistence.n:
        raise keys.get("m", node).error(f"m ({persistence.m}) cannot be more than n ({persistence.n})")
    return persistence


def _attribution(node: Located) -> Attribution:
    values, keys = read_section(node, Attribution)
    if "output" in values and "target" in values:
        raise keys["target"].error("give output (an attribution tensor) or target (for a surrogate), not both")
    return Attribution(**values)


def _ground_truth(node: Located) -> GroundTruth:
    def task(n: Located) -> str:
        value = n.string()
        if value not in GROUND_TRUTH_TASKS:
            raise n.error(f"unknown task {value!r} (classification or regression)")
        return value

    values, _ = read_section(node, GroundTruth, {"task": task}, required=("output",))
    return GroundTruth(**values)


def read_capture(node: Located, base: Path) -> Capture:
    """A route's ``capture`` section; a relative ``path`` is taken from ``base``."""

    def directory(n: Located) -> str:
        path = path_of(n, base)
        if probe(n, path, Path.exists) and not probe(n, path, Path.is_dir):
            raise n.error(f"not a directory: {shown(path)}")
        return str(path)

    values, _ = read_section(node, Capture, {"path": directory}, required=("path",))
    return Capture(**values)


def read_redact(node: Located, match: RouteMatch) -> tuple[str, ...]:
    """Input tensor names to redact; only KServe ModelInfer requests can be redacted, so a route must be able to
    carry them."""
    names: list[str] = []
    for item in node.sequence():
        name = item.string()
        if name in names:
            raise item.error(f"input {name!r} is listed twice")
        names.append(name)
    if not names:
        raise node.error("give the input tensors to redact, or leave redact out")
    if not RouteMatch(method=match.method).covers(RouteMatch(method=MODEL_INFER)):
        raise node.error(
            f"redact applies to KServe ModelInfer requests; this route matches only {match.method}: nothing to redact"
        )
    return tuple(names)
