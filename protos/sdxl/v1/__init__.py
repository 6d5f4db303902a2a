"""sdxl.v1 messages and stubs: *_pb2 modules generated from the .proto files beside them."""
