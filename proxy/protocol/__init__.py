"""KServe V2 / Open Inference Protocol on the wire: protobuf fields read without decoding, tensors and datatypes."""
