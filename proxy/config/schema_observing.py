"""The schema of a route's observers: drift monitoring (with ground truth, attribution and multivariate drift) and
capture. Frozen dataclasses, each field a documented key (mlmirror.config.keys); durations in seconds, sizes in
bytes, percents 0-100.
"""

# ruff: noqa: RUF009 - setting() is a dataclasses.field with documentation, called once per class
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from mlmirror.config.keys import setting
from mlmirror.kernels.methods import DRIFT_METHODS as METHOD_REGISTRY

__all__ = [
    "CAPTURE_INCLUDE",
    "DATA_QUALITY_CHECKS",
    "DRIFT_METHODS",
    "GROUND_TRUTH_TASKS",
    "Attribution",
    "Capture",
    "Drift",
    "DriftFeature",
    "GroundTruth",
    "Multivariate",
    "Persistence",
]

#: Drift methods and their default thresholds (from the method registry, mlmirror/kernels/methods.py): a feature
#: drifts when the score is above it (below it for the methods whose scores are p-values).
DRIFT_METHODS = {name: method.default_threshold for name, method in METHOD_REGISTRY.items()}
CAPTURE_INCLUDE = ("request", "response", "both")
GROUND_TRUTH_TASKS = ("classification", "regression")
#: Data-quality checks per series and window and their default thresholds (shares, 0-1; docs/DRIFT.md).
DATA_QUALITY_CHECKS = {"missing": 0.05, "out_of_range": 0.05, "unseen_category": 0.05}


@dataclass(frozen=True, slots=True, kw_only=True)
class DriftFeature:
    """One monitored feature: column ``column`` of input tensor ``input`` (all of a 1-column tensor when None).
    ``categorical``: values are categories (BYTES tensors always are)."""

    name: str = setting(doc="the `series` label", shown="`input[column]`, or `input`")
    input: str = setting(doc="the input tensor")
    column: int | None = setting(None, "its column (second dimension); none: a 1-column tensor", shown="all",
                                 minimum=0, maximum=1_000_000)  # fmt: skip
    categorical: bool = setting(False, "values are categories (BYTES tensors always are)")


@dataclass(frozen=True, slots=True, kw_only=True)
class GroundTruth:
    """Joining predictions with outcomes reported later (``ReportOutcome``).

    ``output``: the output tensor holding the prediction (classification: argmax of a [n, k] tensor, or the label of
    a [n] one; regression: the value). Predictions wait at most ``ttl`` seconds and ``max_pending`` at a time;
    quality is computed per model version every ``window`` outcome rows.
    """

    output: str = setting(doc="output tensor holding the prediction; turns ground truth on")
    task: str = setting(
        "classification", "`classification` (argmax of a [n, k] output, or the label of a [n] one) or `regression`",
        choices=GROUND_TRUTH_TASKS, what="task",
    )  # fmt: skip
    ttl: float = setting(3600.0, "how long a prediction waits for its outcome", kind="duration", minimum=1.0)
    max_pending: int = setting(
        20_000, "predictions waiting at most; memory: about 0.8 KB each for 4-row calls (about 16 MiB at the "
        "default, 77 MiB (85 MiB at peak) at 100000; docs/RELIABILITY.md)", minimum=1, maximum=100_000_000,
    )  # fmt: skip
    window: int = setting(1000, "outcome rows per quality window (per model version)", minimum=10,
                          maximum=10_000_000)  # fmt: skip
    target: float | None = setting(
        None, "classification: the estimated accuracy (label-free, docs/DRIFT.md) below which, for `target_windows` "
        "drift windows in a row, `mlmirror_quality_estimate_below_target` is 1", shown="none", minimum=0, maximum=1,
    )  # fmt: skip
    target_windows: int = setting(3, "drift windows in a row below `target` before it is flagged", minimum=1,
                                  maximum=1000)  # fmt: skip
    calibration: int = setting(
        1000, "classification: the first outcome rows joined for a model version are its labelled reference, on "
        "which its probabilities are calibrated (isotonic); until then, or with 0, they are assumed calibrated",
        minimum=0, maximum=1_000_000,
    )  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class Attribution:
    """Feature-attribution drift: importances from the attribution ``output`` tensor (one column per numeric
    feature), or from a linear surrogate of the ``target`` output series (default: the first numeric output
    series); flagged when the NDCG against the reference's ranking is below ``threshold``."""

    output: str | None = setting(
        None, "an output tensor of attributions, one column per numeric feature; without it, a linear surrogate"
    )
    target: str | None = setting(None, "the output series the surrogate explains", shown="first numeric output series")
    threshold: float = setting(0.9, "NDCG below which attribution drift is flagged", minimum=0, maximum=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Multivariate:
    """PCA reconstruction error of the numeric features: components explaining ``variance`` of the reference's
    standardized variance; flagged above the reference chunks' mean + ``k`` standard deviations."""

    variance: float = setting(
        0.65, "share of the reference's standardized variance the PCA components explain", minimum=0.01, maximum=1
    )
    k: float = setting(3.0, "flagged above the reference chunks' mean + k standard deviations", minimum=0,
                       maximum=100)  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class Persistence:
    """A drifted state that lasts: a series is *persistent* when it drifted in at least ``m`` of the last ``n``
    windows of its model version (``mlmirror_drift_persistent``, which the shipped alert rules read)."""

    m: int = setting(2, "windows that must have drifted, of the last `n`", minimum=1, maximum=1000)
    n: int = setting(3, "the windows looked at (at least `m`)", minimum=1, maximum=1000)


@dataclass(frozen=True, slots=True, kw_only=True)
class Drift:
    """A route's drift monitoring: which inputs and outputs, how they are binned, windowed and judged.

    A window (per model version) closes after ``window`` calls or ``window_time`` seconds, whichever comes first
    (either may be None, not both); ``sliding`` > 0 also scores the sum of the last ``sliding`` windows. Windows are
    compared with the reference: a profile file, or the first ``capture`` calls the route sees. ``methods`` are
    computed for every series; ``detect`` is the one whose flag says "drifted"; ``thresholds`` override
    ``DRIFT_METHODS``' defaults, and ``calibrate`` (k) replaces the distance thresholds of each series by mean + k sd
    of its scores on chunks of the captured reference. ``alarm_level``: the chance that any series of a healthy window
    is called drifted (Holm over the window's p-values; docs/DRIFT.md); ``persistence``: m of the last n windows.
    """

    features: tuple[DriftFeature, ...] = setting((), "the input columns watched", shown="every column of every input")
    outputs: tuple[str, ...] = setting(
        (), "output tensors watched (each column a series; integer and BYTES outputs are categorical)",
        shown="every output",
    )  # fmt: skip
    bins: int = setting(10, "quantile bins per numeric series", minimum=1, maximum=1000)
    window: int | None = setting(1000, "calls per window (per model version); `null` for time-only windows",
                                 minimum=10, maximum=10_000_000)  # fmt: skip
    window_time: float | None = setting(None, "a window also closes after this long, whichever comes first",
                                        kind="duration", minimum=0.1)  # fmt: skip
    sliding: int = setting(0, "also score the last N windows together (a sliding view); 0: off", minimum=0,
                           maximum=1000)  # fmt: skip
    profile: str | None = setting(
        None, "a reference profile file (`mlmirror profile build`); without it, the first `capture` calls are the "
        "reference", kind="file",
    )  # fmt: skip
    capture: int = setting(1000, "calls captured as the reference when there is no profile", minimum=10,
                           maximum=10_000_000)  # fmt: skip
    methods: tuple[str, ...] = setting(
        ("ks", "psi", "js"), "scores computed per series: " + ", ".join(f"`{m}`" for m in DRIFT_METHODS)
    )
    detect: str = setting(
        "ks", "the method whose threshold decides \"drifted\" (`chi2` stands in for `ks` on categorical series, and "
        "`ks` for `chi2` on numeric ones)", choices=tuple(DRIFT_METHODS), what="drift method",
    )  # fmt: skip
    thresholds: Mapping[str, float] = setting(
        factory=lambda: MappingProxyType(dict(DRIFT_METHODS)), each="<method>",
        shown=", ".join(f"{m} `{t}`" for m, t in DRIFT_METHODS.items()),
        doc="drifted when the score is above it (below it for the p-values of `ks`, `chi2`)",
    )  # fmt: skip
    queue_size: int = setting(10_000, "calls waiting for the engine; more are dropped and counted", minimum=1,
                              maximum=10_000_000)  # fmt: skip
    history: int = setting(20, "closed windows kept for `/status`", minimum=1, maximum=10_000)
    ground_truth: GroundTruth | None = setting(None, "join predictions with outcomes reported later (`ReportOutcome`)")
    segment: str | None = setting(
        None, "a categorical feature whose values are segments: prediction shares, estimated and realized accuracy per "
        "value, and the largest gaps (needs a classification `ground_truth`)", shown="none",
    )  # fmt: skip
    segment_values: int = setting(
        10, "segment values kept (the reference's most frequent); the rest are folded into `other`", minimum=1,
        maximum=100,
    )  # fmt: skip
    data_quality: Mapping[str, float] = setting(
        factory=lambda: MappingProxyType(dict(DATA_QUALITY_CHECKS)), each="<check>",
        shown=", ".join(f"{c} `{t}`" for c, t in DATA_QUALITY_CHECKS.items()),
        doc="a series' data-quality check is flagged when its share in a window exceeds the reference's by more",
    )  # fmt: skip
    attribution: Attribution | None = setting(None, "feature-attribution drift (`{}` turns it on with the defaults)")
    multivariate: Multivariate | None = setting(
        factory=Multivariate, doc="PCA reconstruction error of the numeric features (`off` disables)"
    )
    calibrate: float | None = setting(
        None, "`k`: each series' distance thresholds become mean + k·sd of its scores on window-sized chunks of the "
        "captured reference", shown="off", minimum=0, maximum=100,
    )  # fmt: skip
    alarm_level: float | None = setting(
        0.01, "family-wise false-alarm level of a window: the chance that any of its series is called drifted when "
        "none drifted (Holm's correction over the series' p-values; distances get theirs from a bootstrap of the "
        "reference); `off`: each series at its own threshold", minimum=1e-6, maximum=0.5,
    )  # fmt: skip
    persistence: Persistence | None = setting(
        None, "`{m, n}`: a series is persistent when it drifted in m of the last n windows (`{}`: 2 of 3)",
        shown="off (persistent = drifted in the latest window)",
    )  # fmt: skip
    export_bins: tuple[str, ...] = setting(
        (), "series whose per-bin counts (latest window and reference) are exported, for fleet-wide drift in "
        "Prometheus; each costs bins + 2 series",
    )  # fmt: skip
    model_version: str = setting("unknown", "the version of calls whose response carries no `model_version`")
    percent: float = setting(
        100.0, "share of calls watched, chosen by the request-id hash (as shadows sample): the engine's CPU scales "
        "with it", minimum=0, maximum=100,
    )  # fmt: skip
    max_versions: int = setting(
        8, "(model, version) pairs tracked at once, with their windows and series; one more retires the least "
        "recently seen (counted in `mlmirror_drift_versions_retired_total`)", minimum=1, maximum=1000,
    )  # fmt: skip

    def threshold(self, method: str) -> float:
        return self.thresholds[method]


@dataclass(frozen=True, slots=True, kw_only=True)
class Capture:
    """Sampled calls of a route written as JSON lines to rotating files in the directory ``path``.

    ``percent`` (0-100) of calls are captured, chosen by the request-id hash as shadows choose theirs (the same calls
    on every replica). A file grows to at most ``max_file_bytes`` bytes, then the next one starts; at most
    ``max_files`` files are kept (the oldest is deleted), so captures take at most ``max_files * max_file_bytes``
    bytes of disk. At most ``queue_size`` records wait for the writer thread; beyond that they are dropped and
    counted. ``include``: ``request``, ``response`` or ``both``; ``tensors``: also write the decoded KServe tensors.
    """

    path: str = setting(
        doc="the directory (relative to the config file; created at start; one per route and per replica)",
        kind="directory",
    )  # fmt: skip
    percent: float = setting(100.0, "share of calls captured, chosen by request-id hash as shadows are", minimum=0,
                             maximum=100)  # fmt: skip
    include: str = setting("both", "which messages (bytes, and tensors) a record holds", choices=CAPTURE_INCLUDE,
                           what="include")  # fmt: skip
    tensors: bool = setting(True, "also write ModelInfer calls' decoded tensors as lists")
    max_file_bytes: int = setting(
        64 * 2**20, "a file grows to at most this (at least `4KiB`), then the next one starts; a larger record is "
        "dropped (`too_large`)", kind="size", minimum=4096,
    )  # fmt: skip
    max_files: int = setting(10, "files kept, the oldest deleted: at most `max_files` times `max_file_bytes` on disk",
                             minimum=1, maximum=100_000)  # fmt: skip
    queue_size: int = setting(1000, "records waiting for the writer thread; more are dropped (`queue_full`)",
                              minimum=1, maximum=1_000_000)  # fmt: skip
