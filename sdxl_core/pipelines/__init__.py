"""In-process SDXL pipelines: short chains of the core's stage functions, safe to share across threads."""

from sdxl_core.pipelines.common import SDXLPipelineOutput
from sdxl_core.pipelines.img2img import SDXLImg2ImgPipeline
from sdxl_core.pipelines.inpaint import SDXLInpaintPipeline
from sdxl_core.pipelines.text2img import SDXLPipeline

__all__ = ["SDXLImg2ImgPipeline", "SDXLInpaintPipeline", "SDXLPipeline", "SDXLPipelineOutput"]
