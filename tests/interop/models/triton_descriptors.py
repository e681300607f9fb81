"""Write Triton's gRPC service descriptors (as compiled into tritonclient) as a FileDescriptorSet.

Run with the triton venv's Python: python triton_descriptors.py OUT
"""

import sys

from google.protobuf import descriptor_pb2
from tritonclient.grpc import service_pb2

files = descriptor_pb2.FileDescriptorSet()
seen = set()


def add(descriptor):
    if descriptor.name in seen:
        return
    for dependency in descriptor.dependencies:
        add(dependency)
    seen.add(descriptor.name)
    descriptor.CopyToProto(files.file.add())


add(service_pb2.DESCRIPTOR)
with open(sys.argv[1], "wb") as out:
    out.write(files.SerializeToString())
