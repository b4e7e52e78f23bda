"""The HMA world model (Heterogeneous Masked Autoregression), as a package:

- ``config.py``: ``HMAConfig``, ``EmbodimentSpec`` and the size presets;
- ``layers.py``: attention within and across frames, RoPE, the adaLN-modulated block;
- ``embodiment.py``: per-robot stems and heads and the routing of a batch's rows to them;
- ``heads.py``: the image heads (codes, factorised FSQ codes, diffusion on latents) behind one interface;
- ``cache.py``: the key/value cache of generation and its window;
- ``model.py``: ``HMA``, the trunk and the masking objective.
"""

from hma_gym.models.hma.cache import HMACache
from hma_gym.models.hma.config import HMA_PRESETS, IMAGE_HEADS, OBJECTIVES, EmbodimentSpec, HMAConfig
from hma_gym.models.hma.heads import (
    CodeHead,
    DiffusionHead,
    FactorizedHead,
    ImageHead,
    sample_categorical,
    sample_image_mask,
)
from hma_gym.models.hma.model import HMA, make_hma

__all__ = [
    "IMAGE_HEADS",
    "OBJECTIVES",
    "CodeHead",
    "DiffusionHead",
    "EmbodimentSpec",
    "FactorizedHead",
    "HMAConfig",
    "HMA",
    "HMACache",
    "HMA_PRESETS",
    "ImageHead",
    "make_hma",
    "sample_categorical",
    "sample_image_mask",
]
