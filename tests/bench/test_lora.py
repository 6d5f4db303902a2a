"""bench.lora on the tiny config: every variant runs, and the fused forward computes what the unfused one does."""

import torch

from bench import lora
from sdxl_core.lora import applied, fuse, load_adapter, unfuse
from sdxl_core.lora.write import kohya_tensors, random_layers


def test_the_bench_times_every_variant():
    result = lora.measure("tiny", rank=4, size=64, rows=2, repeats=1, device="cpu", dtype=torch.float32)
    assert result["layers"] > 0 and result["adapter_mib"] > 0
    assert all(0 < result[name] < 60 for name in ("none", "unfused", "unfused, half the rows", "fused"))


@torch.no_grad()
def test_its_adapter_adapts_every_targeted_layer_and_fused_equals_unfused():
    unet = lora.random_unet(lora.CONFIGS["tiny"])
    adapter = load_adapter("<test>", {"unet": unet}, tensors=kohya_tensors(
        random_layers({"unet": unet}, 4, seed=0, targets=lora.TARGETS)))
    linear = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(lora.TARGETS)]
    assert sorted(adapter.layers["unet"]) == sorted(linear)
    inputs = lora.unet_inputs(unet, 8, 2)
    with applied({adapter: 1.0}):
        unfused = unet(*inputs)
    fuse({adapter: 1.0})
    fused = unet(*inputs)
    unfuse({adapter: 1.0})
    torch.testing.assert_close(fused, unfused, atol=1e-4, rtol=0)
    assert (unet(*inputs) - unfused).abs().max() > 1e-3
