"""The wire contract: package sdxl.v1, generated from protos/ by the build."""
