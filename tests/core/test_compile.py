"""torch.compile of the UNet: one graph, no breaks, and the compiled output equals eager."""

from dataclasses import replace

import pytest
import torch

from sdxl_core.conditioning import add_time_ids
from sdxl_core.configs import TINY_BASE_UNET
from sdxl_core.loading.components import empty_unet
from sdxl_core.tiny import random_init

# Two levels, one transformer layer: every kind of block the full UNet has, small enough
# that inductor compiles it in seconds on 2 cores.
CONFIG = replace(TINY_BASE_UNET, block_out_channels=(32, 32), cross_attention=(False, True),
                 transformer_layers_per_block=(1, 1), num_attention_heads=(2, 2))


@pytest.fixture(scope="module")
def unet_and_inputs():
    unet = random_init(empty_unet(CONFIG), "unet").eval()
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, CONFIG.cross_attention_dim, generator=gen)
    pooled = torch.randn(2, CONFIG.pooled_projection_dim, generator=gen)
    time_ids = add_time_ids(CONFIG, (64, 64), target_size=(64, 64), batch_size=2)
    return unet, (sample, torch.tensor([999, 500]), context, pooled, time_ids)


def test_unet_forward_traces_as_one_graph_without_breaks(unet_and_inputs):
    unet, inputs = unet_and_inputs
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(unet)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@torch.no_grad()
def test_compiled_unet_equals_eager(unet_and_inputs):
    unet, inputs = unet_and_inputs
    torch._dynamo.reset()
    compiled = torch.compile(unet, mode="reduce-overhead", fullgraph=True)
    assert (compiled(*inputs) - unet(*inputs)).abs().max().item() <= 1e-4
