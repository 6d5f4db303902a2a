"""The sdxl.v1 client library and the sdxl command: grpcio, protobuf and Pillow only, no torch."""
