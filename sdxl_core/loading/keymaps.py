"""Key maps: how one original single-file tensor becomes our state-dict tensors, and back.

A map is a list of KeyPairs, one per tensor of the original checkpoint. Each pair
names the model tensor(s) it holds and the layout change between them: none, a
1x1 conv stored for a linear layer, a transposed matrix, or q/k/v stacked by rows.
The per-component maps are in keymaps_unet.py, keymaps_vae.py and keymaps_clip.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial

import torch

from sdxl_core.loading.strict import TensorSpec

Shape = tuple[int, ...]


class Copy:
    """The same tensor under another name."""

    def model_shapes(self, shape: Shape) -> list[Shape]:
        return [shape]

    def part(self, t: torch.Tensor, i: int) -> torch.Tensor:
        return t

    def join(self, ts: list[torch.Tensor]) -> torch.Tensor:
        return ts[0]


class Conv1x1:
    """A linear layer (O, I) that the original stores as a 1x1 convolution (O, I, 1, 1)."""

    def model_shapes(self, shape: Shape) -> list[Shape]:
        return [shape[:2] if shape[2:] == (1, 1) else shape]

    def part(self, t: torch.Tensor, i: int) -> torch.Tensor:
        return t.flatten(1)

    def join(self, ts: list[torch.Tensor]) -> torch.Tensor:
        return ts[0][:, :, None, None]


class Transpose:
    """OpenCLIP's text_projection P, applied as x @ P; transformers' Linear weight is P.T."""

    def model_shapes(self, shape: Shape) -> list[Shape]:
        return [shape[::-1]]

    def part(self, t: torch.Tensor, i: int) -> torch.Tensor:
        return t.T.contiguous()

    def join(self, ts: list[torch.Tensor]) -> torch.Tensor:
        return ts[0].T.contiguous()


@dataclass(frozen=True)
class SplitRows:
    """n tensors stacked by rows into one, like OpenCLIP's attn.in_proj_weight = [q; k; v]."""

    n: int

    def model_shapes(self, shape: Shape) -> list[Shape]:
        if not shape or shape[0] % self.n:  # unsplittable: keep the stored shape, so the shape check fails
            return [shape] * self.n
        return [(shape[0] // self.n, *shape[1:])] * self.n

    def part(self, t: torch.Tensor, i: int) -> torch.Tensor:
        return t.chunk(self.n)[i].clone()  # a clone, so the stacked tensor can be freed

    def join(self, ts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(ts)


Layout = Copy | Conv1x1 | Transpose | SplitRows
COPY, CONV_1X1, TRANSPOSE, SPLIT_QKV = Copy(), Conv1x1(), Transpose(), SplitRows(3)


@dataclass(frozen=True)
class KeyPair:
    """One tensor of the original checkpoint and the model tensor(s) it holds."""

    original: str
    model: tuple[str, ...]
    layout: Layout = COPY

    def read(self, src: TensorSpec) -> list[TensorSpec]:
        """Model specs from the original tensor's spec; data is read and converted only on load()."""
        shapes = self.layout.model_shapes(tuple(src.shape))
        return [TensorSpec(name, shape, partial(_load_part, self.layout, src.load, i))
                for i, (name, shape) in enumerate(zip(self.model, shapes))]

    def write(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The original tensor, from the model's state dict."""
        return self.layout.join([state[name] for name in self.model])


def _load_part(layout: Layout, load: Callable[[], torch.Tensor], i: int) -> torch.Tensor:
    # q, k and v each read the stacked tensor: simpler than sharing it, and it is small.
    return layout.part(load(), i)


def pair(original: str, model: str, layout: Layout = COPY) -> KeyPair:
    return KeyPair(original, (model,), layout)


def weight_and_bias(original_module: str, model_module: str) -> list[KeyPair]:
    """The two pairs of a layer with a weight and a bias (conv, linear, norm)."""
    return [pair(f"{original_module}.{p}", f"{model_module}.{p}") for p in ("weight", "bias")]


def prefixed(pairs: Iterable[KeyPair], original_prefix: str) -> list[KeyPair]:
    """The same pairs with the original names under a prefix such as "model.diffusion_model."."""
    return [KeyPair(original_prefix + p.original, p.model, p.layout) for p in pairs]
