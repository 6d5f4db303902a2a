"""SDXL in plain PyTorch: models, weight loading and the stage functions the services run."""
