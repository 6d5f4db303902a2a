"""Text-encoder key maps: CLIP ViT-L (already transformers' names) and OpenCLIP bigG <-> transformers.

Model names are relative to the transformers model; `text_model` is the prefix of its
text transformer ("text_model." for CLIPTextModelWithProjection, "" for a CLIPTextModel
that transformers >= 5.6 builds flat). Follows diffusers' convert_ldm_clip_checkpoint and
convert_open_clip_checkpoint (diffusers/loaders/single_file_utils.py, 0.42.1).
"""

from __future__ import annotations

from sdxl_core.configs import TextEncoderConfig
from sdxl_core.loading.keymaps import SPLIT_QKV, TRANSPOSE, KeyPair, pair, weight_and_bias

LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
         "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2")

# OpenCLIP's residual attention block -> CLIPEncoderLayer, apart from the stacked in_proj.
OPEN_CLIP_LAYER = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def clip_keymap(config: TextEncoderConfig, text_model: str = "text_model.") -> list[KeyPair]:
    """CLIP-L: the original holds transformers' text_model tensors (relative to "...transformer.text_model.")."""
    names = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
             "final_layer_norm.weight", "final_layer_norm.bias"]
    names += [f"encoder.layers.{i}.{m}.{p}" for i in range(config.num_hidden_layers) for m in LAYER
              for p in ("weight", "bias")]
    return [pair(n, text_model + n) for n in names]


def open_clip_keymap(config: TextEncoderConfig, text_model: str = "text_model.") -> list[KeyPair]:
    """OpenCLIP bigG text tower + projection (original names relative to "...model.")."""
    pairs = [pair("token_embedding.weight", f"{text_model}embeddings.token_embedding.weight"),
             pair("positional_embedding", f"{text_model}embeddings.position_embedding.weight")]
    for i in range(config.num_hidden_layers):
        original, ours = f"transformer.resblocks.{i}", f"{text_model}encoder.layers.{i}.self_attn"
        for p in ("weight", "bias"):
            qkv = tuple(f"{ours}.{m}_proj.{p}" for m in "qkv")
            pairs.append(KeyPair(f"{original}.attn.in_proj_{p}", qkv, SPLIT_QKV))
        for o, m in OPEN_CLIP_LAYER.items():
            pairs += weight_and_bias(f"{original}.{o}", f"{text_model}encoder.layers.{i}.{m}")
    pairs += weight_and_bias("ln_final", f"{text_model}final_layer_norm")
    if config.with_projection:
        pairs.append(pair("text_projection", "text_projection.weight", TRANSPOSE))
    return pairs
