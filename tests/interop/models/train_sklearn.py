"""Train the scikit-learn models MLServer serves (run with the MLServer venv's Python): a seeded synthetic
4-feature, 3-class data set, and two LogisticRegression versions that differ slightly (other rows, other C).

    python train_sklearn.py FOLDER   ->  FOLDER/train.npy, FOLDER/v1.joblib, FOLDER/v2.joblib
"""

import json
import sys
from pathlib import Path

import joblib
import numpy as np
import sklearn
from sklearn.linear_model import LogisticRegression

out = Path(sys.argv[1])
rng = np.random.default_rng(7)
n = 3000
x = rng.normal(size=(n, 4)).astype(np.float32)
w = np.array([[1.5, -1.0, 0.5], [-0.5, 1.2, -0.8], [0.8, 0.3, -1.2], [-1.0, 0.6, 0.9]])
y = np.argmax(x @ w + rng.gumbel(size=(n, 3)), axis=1)
np.save(out / "train.npy", x)
v1 = LogisticRegression(C=1.0, max_iter=1000).fit(x[:2000], y[:2000])
v2 = LogisticRegression(C=0.01, max_iter=1000).fit(x[1000:], y[1000:])
joblib.dump(v1, out / "v1.joblib")
joblib.dump(v2, out / "v2.joblib")
print(json.dumps({"rows": n, "sklearn": sklearn.__version__}))
