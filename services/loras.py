"""A stage's LoRA adapters: the .safetensors files of its --lora-dir by name (the file's stem), loaded on first use
against the stage's models and kept in a bounded cache (least recently used out; a changed file loads again)."""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn

from sdxl.v1 import stage_pb2
from sdxl_core.lora import Loras, load_adapter

CACHE_SIZE = 8  # adapters loaded at once per model (--lora-cache); an SDXL rank-32 adapter is about 0.2-0.5 GB fp16
MAX_ADAPTERS = 16  # adapters one request may name
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
SUFFIX = ".safetensors"


def adapter_key(adapters: Sequence[stage_pb2.LoraAdapter]) -> tuple[tuple[str, float], ...]:
    """A request's adapters as (name, weight) pairs, weight 1 where unset; ValueError on a bad name or weight."""
    if len(adapters) > MAX_ADAPTERS:
        raise ValueError(f"at most {MAX_ADAPTERS} LoRA adapters per request, got {len(adapters)}")
    pairs = []
    for adapter in adapters:
        if not NAME.fullmatch(adapter.name):
            raise ValueError(f"LoRA adapter name {adapter.name!r} is not a file name (letters, digits, . _ + -)")
        weight = adapter.weight if adapter.HasField("weight") else 1.0
        if not math.isfinite(weight):
            raise ValueError(f"LoRA adapter {adapter.name!r} has weight {weight}; weights must be finite")
        pairs.append((adapter.name, float(weight)))
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"LoRA adapters named more than once: {names}")
    return tuple(pairs)


class LoraLibrary:
    """The adapters of one folder for one set of models ({"unet": ...} or the text encoders)."""

    def __init__(self, folder: str | Path | None, models: Mapping[str, nn.Module | None],
                 cache_size: int = CACHE_SIZE):
        if cache_size < 1:
            raise ValueError(f"--lora-cache must be >= 1, got {cache_size}")
        self.folder = None if folder is None else Path(folder)
        self.models, self.cache_size = dict(models), cache_size
        self._cache: OrderedDict[str, tuple[tuple, object]] = OrderedDict()  # name -> (file stamp, adapter)
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """The adapters in the folder now (new files count without a restart)."""
        if self.folder is None or not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob(f"*{SUFFIX}") if NAME.fullmatch(p.stem) and p.is_file())

    def resolve(self, pairs: Sequence[tuple[str, float]]) -> Loras:
        """The named adapters, loaded, with their weights; ValueError (before any work) for an unknown name or a
        file that does not fit the models."""
        if not pairs:
            return {}
        if self.folder is None:
            raise ValueError("this stage serves no LoRA adapters (it was started without --lora-dir)")
        return {self._get(name): weight for name, weight in pairs}

    def _get(self, name: str):
        path = self.folder / f"{name}{SUFFIX}"
        try:
            stat = path.stat()
        except OSError:
            available = self.names()
            raise ValueError(f"unknown LoRA adapter {name!r}; this stage has {available[:20] or 'none'}"
                             f"{' ...' if len(available) > 20 else ''}") from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:  # one load at a time: two requests naming a new adapter load it once
            cached = self._cache.get(name)
            if cached is not None and cached[0] == stamp:
                self._cache.move_to_end(name)
                return cached[1]
            adapter = load_adapter(path, self.models, name)
            self._cache[name] = (stamp, adapter)
            self._cache.move_to_end(name)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)  # jobs still holding it keep it alive until they finish
            return adapter
