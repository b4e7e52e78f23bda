"""Models started from other trained models (`hma-gym train --init RUN --init-mode trunk`): a MaskGIT HMA
on another tokenizer's codes from a trained one's trunk (``copy_trunk``), and a MAR HMA (continuous latents)
from a trained MaskGIT HMA (``mar_from_maskgit``). A shallower HMA from some of a trained one's blocks is
`hma-gym select-layers` (training/select_layers.py).

A MAR HMA and a MaskGIT HMA share the trunk, stems and heads.

Only the image head differs (``HMA.image``: the image input and output). A MaskGIT trunk token embeds its
patch's codes (a sum of learned code embeddings); a MAR trunk token embeds the same patch's continuous
latents (the diffusion head's ``latent_in``). The warm
start copies every shared weight, sets MAR's [MASK] vector to what a fully masked MaskGIT patch embeds
to, and makes a patch's latents embed like its codes (the codes are the rounded latents, FSQ): exactly
with a ``LatticeTable`` (``latent_levels``: a latent embeds as the code it rounds to) whose table is MaskGIT's
code embedding.
The diffusion head is left to training.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from hma_gym.models.hma import HMA

IMAGE_IO = ("image.",)  # the image head's weights: the rest is shared by every HMA of the same trunk


def copy_trunk(model: HMA, source: HMA) -> dict[str, list[str]]:
    """Copy into ``model`` every weight of ``source`` except the image input and output (``IMAGE_IO``): the
    trunk, positions, stems and heads, e.g. to start a model on another tokenizer's codes (another
    codebook, or the factorised head) from a trained one. Both must have the same trunk (width, depth,
    heads, patch size, action tokens, grid) and embodiments. Returns the copied and the left-out names."""
    if "mar" in (model.config.head, source.config.head):
        raise ValueError("copy_trunk is for maskgit models; a mar model starts from a maskgit one with "
                         "mar_from_maskgit")
    weights = source.state_dict()
    shared = {k: v for k, v in weights.items() if not k.startswith(IMAGE_IO)}
    try:
        missing, unexpected = model.load_state_dict(shared, strict=False)
    except RuntimeError as err:  # a size mismatch
        raise ValueError(f"copy_trunk: the model and the source differ in more than the image head ({err})") from err
    stray = [k for k in missing if not k.startswith(IMAGE_IO)]
    if unexpected or stray:
        raise ValueError(f"copy_trunk: weights only the source has {unexpected}, only the model has {stray}: "
                         "the model and the source differ in more than the image head")
    return {"copied": list(shared), "left_out": [k for k in weights if k not in shared]}


def mar_from_maskgit(maskgit: HMA, latent_dim: int, **mar_config) -> HMA:
    """A MAR model with ``maskgit``'s architecture and every weight the variants share; ``mar_config``:
    the MAR fields of HMAConfig (latent_levels, the tokenizer's FSQ levels, and diff_width, ...). Its
    lattice input's table is ``maskgit``'s code embedding."""
    if not mar_config.get("latent_levels"):
        raise ValueError("the mar warm start needs latent_levels (the tokenizer's FSQ levels): the mar model "
                         "then embeds a latent as the maskgit model embeds its code")
    if maskgit.config.head != "maskgit":
        raise ValueError("the source model is already a mar model")
    if maskgit.config.factorized:
        raise ValueError("the source model has a factorised head (code_levels); the mar warm start needs a "
                         "code embedding table")
    config = replace(maskgit.config, head="mar", latent_dim=latent_dim, **mar_config)
    mar = HMA(config)
    shared = {k: v for k, v in maskgit.state_dict().items() if not k.startswith(IMAGE_IO)}
    missing, unexpected = mar.load_state_dict(shared, strict=False)
    stray = [k for k in missing if not k.startswith(IMAGE_IO)]
    if unexpected or stray:
        raise RuntimeError(f"warm start: unexpected weights {unexpected}, missing shared weights {stray}")
    V, group, table = maskgit.config.vocab_size, maskgit.group, mar.image.latent_in
    if table.n_codes != V:
        raise ValueError(f"latent_levels {config.latent_levels} make {table.n_codes} codes; the MaskGIT model has {V}")
    with torch.no_grad():
        mar.image.mask_emb.copy_(maskgit.image.mask_embedding())  # a patch whose every code is [MASK]
        codes = maskgit.image.tok_emb.weight.view(group, V + 1, -1)[:, :V]  # each position's table less [MASK]
        table.table.weight.copy_(codes.reshape(group * V, -1))
    return mar
