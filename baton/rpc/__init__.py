"""Code shared by the three services: protobuf conversions, KV transfer, the gRPC server frame, the registry."""
