"""`hma-gym select-layers`: a shallower HMA from chosen transformer blocks of a trained one (model surgery).

The output is a run directory (dynamics.safetensors, dynamics.json, normalization.safetensors) that
`hma-gym train --init OUT` fine-tunes, so the model adapts to its missing blocks; e.g. the `fast` variant
is blocks 0 and 3 of the default model (`make lift-fast`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from hma_gym.checkpoint import CheckpointError, load_tensors, save_module, save_tensors
from hma_gym.models.hma import HMA
from hma_gym.world_model import load_dynamics


@dataclass
class SelectLayersConfig:
    """Keep some transformer blocks of a trained HMA, as the start of a faster model."""

    source: str
    """A `train` run directory or a packed checkpoint (e.g. hma_gym/assets/lift)."""
    layers: tuple[int, ...]
    """Blocks of the source to keep, in this order (e.g. 0 3: a 2-layer model from a 4-layer one's first and
    last blocks)."""
    out: str
    """Run directory to write, for `hma-gym train --init OUT`."""

    def __post_init__(self) -> None:
        self.layers = tuple(int(i) for i in self.layers)
        if not self.layers:
            raise ValueError("layers: keep at least one block")
        if min(self.layers) < 0 or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be distinct block indices >= 0. Got {self.layers=}")


def keep_layers(model: HMA, layers: tuple[int, ...] | list[int]) -> HMA:
    """A copy of ``model`` with only the transformer blocks ``layers`` (indices into ``model.blocks``, kept in
    the given order) and every other weight (embeddings, stems, heads) unchanged: the start of a shallower,
    faster model that fine-tuning adapts to its missing blocks."""
    n = model.config.n_layer
    layers = [int(i) for i in layers]
    if not layers:
        raise ValueError("keep at least one layer")
    if len(set(layers)) != len(layers) or not all(0 <= i < n for i in layers):
        raise ValueError(f"layers must be distinct block indices in [0, {n - 1}]. Got {layers}")
    small = HMA(replace(model.config, n_layer=len(layers)))
    renamed = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            index, rest = key[len("blocks."):].split(".", 1)
            if int(index) not in layers:
                continue
            key = f"blocks.{layers.index(int(index))}.{rest}"
        renamed[key] = value
    small.load_state_dict(renamed, strict=True)
    return small.train(model.training)


def select_layers(cfg: SelectLayersConfig) -> dict:
    """Write the shallower model and the source's statistics to ``cfg.out``; returns a short report."""
    model, meta = load_dynamics(cfg.source)
    try:
        small = keep_layers(model, cfg.layers)
    except ValueError as err:
        raise CheckpointError(f"{cfg.source} has {model.config.n_layer} blocks: {err}") from err
    norms = load_tensors(Path(cfg.source) / "normalization.safetensors")
    meta = {k: v for k, v in meta.items() if k != "packed"}
    meta.update(hma=small.config.to_dict(),
                selected_layers={"source": cfg.source, "layers": list(cfg.layers),
                                 "source_n_layer": model.config.n_layer})
    save_module(cfg.out, "dynamics", small, meta)
    save_tensors(Path(cfg.out) / "normalization.safetensors", norms)
    report = {"out": cfg.out, "layers": list(cfg.layers), "params": small.num_params(),
              "source_params": model.num_params()}
    print(json.dumps(report))
    return report
