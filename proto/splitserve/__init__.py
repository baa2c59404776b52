"""Generated protobuf and gRPC code for splitserve's services (sources: the .proto files beside the modules)."""
