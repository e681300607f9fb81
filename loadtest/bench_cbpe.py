"""mlmirror's label-free accuracy estimate against NannyML's CBPE on the same seeded data (docs/DRIFT.md).

The world is tests/test_quality.py's: three classes, P(y | x) fixed, an overconfident model (softmax(1.8 W x)); a
labelled reference of 5000 rows at radius 1.75 (accuracy ~0.95), then windows of 1000 rows at radius 1.75 (no
shift) and 0.95 (covariate shift, accuracy ~0.80). NannyML pins old packages, so it runs in its own venv:

    python -m loadtest.bench_cbpe --write /tmp/cbpe.npz          # data + mlmirror's estimates (this repo's venv)
    /tmp/nannyml-venv/bin/python loadtest/bench_cbpe.py --nannyml /tmp/cbpe.npz   # NannyML's, and the table
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

W = np.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
WINDOWS = 5


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def world(rng: np.random.Generator, n: int, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(the model's probabilities [n, 3], true classes [n]), as tests/test_quality.py draws them."""
    c = rng.integers(0, 3, n)
    x = W[c] / np.linalg.norm(W[c], axis=1, keepdims=True) * radius + rng.normal(size=(n, 2)) * 0.6
    truth = softmax(x @ W.T)
    y = (rng.random(n)[:, None] > truth.cumsum(axis=1)).sum(axis=1)
    return softmax(1.8 * (x @ W.T)), y


def write(path: str, seeds: list[int]) -> None:
    from mlmirror.observing.groundtruth.estimate import Calibrator, Expected

    arrays: dict[str, np.ndarray] = {}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        p_ref, y_ref = world(rng, 5000, 1.75)
        calibrator = Calibrator.fit(p_ref, y_ref)
        arrays[f"{seed}_ref_p"], arrays[f"{seed}_ref_y"] = p_ref, y_ref
        for name, radius in (("none", 1.75), ("shift", 0.95)):
            ps, ys, estimates = [], [], []
            for _ in range(WINDOWS):
                p, y = world(rng, 1000, radius)
                expected = Expected(1, 3)
                expected.add(p, calibrator.apply(p))
                ps.append(p)
                ys.append(y)
                estimates.append(expected.accuracy())
            arrays[f"{seed}_{name}_p"], arrays[f"{seed}_{name}_y"] = np.concatenate(ps), np.concatenate(ys)
            arrays[f"{seed}_{name}_mlmirror"] = np.array(estimates)
    np.savez(path, seeds=np.array(seeds), **arrays)


def compare(path: str) -> None:
    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")  # NannyML reports usage over the network otherwise
    import nannyml as nml
    import pandas as pd

    data = np.load(path)

    def frame(p: np.ndarray, y: np.ndarray) -> pd.DataFrame:
        df = pd.DataFrame({f"p{c}": p[:, c] for c in range(3)})
        df["pred"], df["y"] = p.argmax(axis=1), y
        return df

    print("| seed | data | window | realized | mlmirror | NannyML CBPE | mlmirror - realized | NannyML - realized |")
    print("|---|---|---|---|---|---|---|---|")
    errors: dict[str, list[float]] = {"mlmirror": [], "nannyml": []}
    for seed in data["seeds"].tolist():
        estimator = nml.CBPE(
            problem_type="classification_multiclass", y_pred_proba={0: "p0", 1: "p1", 2: "p2"}, y_pred="pred",
            y_true="y", metrics=["accuracy"], chunk_size=1000,
        )  # fmt: skip
        estimator.fit(frame(data[f"{seed}_ref_p"], data[f"{seed}_ref_y"]))
        for name in ("none", "shift"):
            p, y = data[f"{seed}_{name}_p"], data[f"{seed}_{name}_y"]
            result = estimator.estimate(frame(p, y)).filter(period="analysis").to_df()
            theirs = result[("accuracy", "value")].to_numpy()
            for w in range(WINDOWS):
                rows = slice(w * 1000, (w + 1) * 1000)
                realized = float(np.mean(p[rows].argmax(axis=1) == y[rows]))
                ours = float(data[f"{seed}_{name}_mlmirror"][w])
                errors["mlmirror"].append(ours - realized)
                errors["nannyml"].append(float(theirs[w]) - realized)
                print(f"| {seed} | {name} | {w} | {realized:.3f} | {ours:.3f} | {theirs[w]:.3f} | "
                      f"{ours - realized:+.3f} | {theirs[w] - realized:+.3f} |")  # fmt: skip
    for who, e in errors.items():
        print(f"{who}: mean |error| {np.mean(np.abs(e)):.4f}, max |error| {np.max(np.abs(e)):.4f}")
    gap = np.array(errors["mlmirror"]) - np.array(errors["nannyml"])
    print(f"mlmirror - NannyML: mean {np.mean(gap):+.4f}, max |.| {np.max(np.abs(gap)):.2e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="NPZ", help="write the data and mlmirror's estimates")
    parser.add_argument("--nannyml", metavar="NPZ", help="estimate with NannyML's CBPE and print the comparison")
    parser.add_argument("--seeds", default="11,21,31,41,51,61", help="comma-separated seeds")
    args = parser.parse_args(argv)
    if args.write:
        write(args.write, [int(s) for s in args.seeds.split(",")])
    elif args.nannyml:
        compare(args.nannyml)
    else:
        parser.error("give --write or --nannyml")


if __name__ == "__main__":
    main(sys.argv[1:])
