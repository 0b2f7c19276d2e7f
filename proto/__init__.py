"""The coordinator's gRPC contract (gptswarm.proto) and its generated Python modules."""

PROTOCOL_VERSION = 3  # bump on any incompatible change to gptswarm.proto
