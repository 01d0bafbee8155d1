"""Writes buf/validate/validate.proto as a FileDescriptorSet, taken from the installed protovalidate wheel.

Its source is on no registry we reach, but the wheel embeds the file's descriptor; protoc reads it with
--descriptor_set_in and buf reads the image protoc builds from it (scripts/gen_protos.sh).
"""

from __future__ import annotations

import sys

from google.protobuf import descriptor_pb2
from protovalidate._gen.buf.validate import validate_pb


def main(out: str) -> None:
    proto = descriptor_pb2.FileDescriptorProto.FromString(validate_pb.desc().proto.to_binary())
    with open(out, "wb") as f:
        f.write(descriptor_pb2.FileDescriptorSet(file=[proto]).SerializeToString())


if __name__ == "__main__":
    main(sys.argv[1])
