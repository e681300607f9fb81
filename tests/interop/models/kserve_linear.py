"""KServe's Python ModelServer serving a fixed linear classifier in numpy (softmax probabilities), REST and
gRPC v2. Run with the kserve venv's Python; KServe's own options (--http_port, --grpc_port, ...) pass through.

    python kserve_linear.py --model_name M --weights W.npz --version V --input_name NAME --grpc_port P ...
"""

import argparse

import kserve
import numpy as np
import uvicorn
from grpc import aio
from kserve import InferOutput, InferRequest, InferResponse


def loopback_only() -> None:
    """KServe 0.21 binds REST to 0.0.0.0 and gRPC to [::], with no option to change it: in this process, make
    both bind 127.0.0.1 instead (the tests run every server on loopback only)."""
    make_server = aio.server

    def server(*args, **kwargs):
        made = make_server(*args, **kwargs)
        add_port = made.add_insecure_port
        made.add_insecure_port = lambda address: add_port(address.replace("[::]:", "127.0.0.1:"))
        return made

    class Config(uvicorn.Config):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "host": "127.0.0.1"})

    aio.server = server
    uvicorn.Config = Config


class Linear(kserve.Model):
    def __init__(self, name, weights, version, input_name):
        super().__init__(name)
        loaded = np.load(weights)
        self.w, self.b = loaded["w"], loaded["b"]
        self.version, self.input_name = version, input_name
        self.ready = True

    def get_input_types(self):
        return [{"name": self.input_name, "datatype": "FP32", "shape": [-1, 4]}]

    def get_output_types(self):
        return [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]

    async def predict(self, payload: InferRequest, headers=None, response_headers=None):
        x = payload.get_input_by_name(self.input_name).as_numpy().astype(np.float32)
        z = x @ self.w + self.b
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        output = InferOutput(name="probabilities", shape=list(p.shape), datatype="FP32")
        output.set_data_from_numpy(p, binary_data=True)
        return InferResponse(
            model_name=self.name, model_version=self.version, infer_outputs=[output], response_id=payload.id
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--version", default="1")
    parser.add_argument("--input_name", default="input-0")
    args, _ = parser.parse_known_args()
    loopback_only()
    kserve.ModelServer().start([Linear(args.model_name, args.weights, args.version, args.input_name)])
