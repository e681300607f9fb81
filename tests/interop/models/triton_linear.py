"""A Triton Python-backend model: a fixed linear classifier in numpy, softmax probabilities out.

The weights are weights.npz beside this file; the input tensor's name is the config's ``input_name`` parameter.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["parameters"]["input_name"]["string_value"]
        weights = np.load(Path(__file__).with_name("weights.npz"))
        self.w, self.b = weights["w"], weights["b"]

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().astype(np.float32)
            z = x @ self.w + self.b
            e = np.exp(z - z.max(axis=1, keepdims=True))
            p = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("probabilities", p)]))
        return responses
