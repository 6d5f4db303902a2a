"""The gRPC stage servers and the orchestrator: thin adapters over sdxl_core stage functions."""
