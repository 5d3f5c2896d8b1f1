"""The gRPC surface: handlers, stream framing, status mapping, interceptors, auth, health and proto <-> domain
conversion. The only layer that knows protobuf."""
