"""StageInfo.Describe: what a stage holds and admits, from what it loaded (protos/sdxl/v1/stage.proto)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable

import grpc
from google.protobuf import struct_pb2

from sdxl.v1 import stage_pb2, stage_pb2_grpc
from sdxl_core.configs import UNetConfig

SERVICE = "sdxl.v1.StageInfo"


def package_version() -> str:
    try:
        return importlib.metadata.version("sdxl-grpc")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def unet_description(config: UNetConfig) -> stage_pb2.UNetDescription:
    return stage_pb2.UNetDescription(
        in_channels=config.in_channels, sample_size=config.sample_size,
        cross_attention_dim=config.cross_attention_dim,
        requires_aesthetics_score=config.requires_aesthetics_score)


def struct(values: dict) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update({k: v for k, v in values.items() if not k.startswith("_")})  # "_class_name" and friends
    return message


class StageInfoServicer(stage_pb2_grpc.StageInfoServicer):
    """Answers with the description the server was given once its weights were loaded, plus what `live` says
    now (what changes while serving: the adapters in a --lora-dir)."""

    def __init__(self):
        self.description: stage_pb2.StageDescription | None = None
        self.live: Callable[[], stage_pb2.StageDescription] | None = None

    def Describe(self, request, context) -> stage_pb2.StageDescription:
        if self.description is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the stage is loading its weights; retry shortly")
        if self.live is None:
            return self.description
        description = stage_pb2.StageDescription()
        description.CopyFrom(self.description)
        description.MergeFrom(self.live())
        return description
