"""SDXL in plain PyTorch: models, weight loading and the stage functions the services run."""

_PIPELINES = ("SDXLPipeline", "SDXLImg2ImgPipeline", "SDXLInpaintPipeline", "SDXLPipelineOutput")


def __getattr__(name: str):
    # Imported on first use, so `import sdxl_core.configs` stays light.
    if name in _PIPELINES:
        from sdxl_core import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module 'sdxl_core' has no attribute {name!r}")
