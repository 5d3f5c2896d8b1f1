"""Generated protobuf and gRPC code for imagesearch.v1 (tools/gen_proto.sh). Do not edit."""
