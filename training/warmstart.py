"""A MAR (soft-token) HMA started from a trained MaskGIT HMA: the two variants share the trunk, stems and heads.

Only the image input and output differ. A MaskGIT trunk token embeds its patch's codes (a sum of learned
code embeddings); a MAR trunk token embeds the same patch's continuous latents (``latent_in``). The warm
start copies every shared weight, sets MAR's [MASK] vector to what a fully masked MaskGIT patch embeds
to, fits ``latent_in`` by regression so that a patch's latents embed close to the sum of its codes'
embeddings (the codes are the rounded latents, FSQ), and leaves the diffusion head to training.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from hma_gym.models.hma import HMA
from hma_gym.models.tokenizer import ImageTokenizer

IMAGE_IO = ("tok_emb.", "image_head.")  # MaskGIT-only weights
MAR_IO = ("latent_in.", "image_mask_emb", "diff_head.")  # MAR-only weights


def mar_from_maskgit(maskgit: HMA, latent_dim: int, **mar_config) -> HMA:
    """A MAR model with ``maskgit``'s architecture and every weight the variants share; ``mar_config``:
    the MAR fields of HMAConfig (diff_width, latent_in_hidden, ...). ``latent_in`` is left at its
    initialisation (see ``fit_latent_in``)."""
    if maskgit.config.soft:
        raise ValueError("the source model is already a mar model")
    config = replace(maskgit.config, head="mar", latent_dim=latent_dim, **mar_config)
    mar = HMA(config)
    shared = {k: v for k, v in maskgit.state_dict().items() if not k.startswith(IMAGE_IO)}
    missing, unexpected = mar.load_state_dict(shared, strict=False)
    stray = [k for k in missing if not k.startswith(MAR_IO)]
    if unexpected or stray:
        raise RuntimeError(f"warm start: unexpected weights {unexpected}, missing shared weights {stray}")
    V, group = maskgit.config.vocab_size, maskgit.group
    with torch.no_grad():  # a patch whose every code is [MASK] (index V of each position's table)
        mask_rows = torch.arange(group) * (V + 1) + V
        mar.image_mask_emb.copy_(maskgit.tok_emb.weight[mask_rows].sum(0))
    return mar


def code_embedding_pairs(maskgit: HMA, mar: HMA, tokenizer: ImageTokenizer, frames: np.ndarray,
                         batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression pairs from uint8 frames (B, H, W, 3): each trunk token's scaled latents (M, p*p*C), as
    ``mar`` sees them, and the embedding MaskGIT gives the codes they round to (M, D)."""
    xs, ys = [], []
    V, group = maskgit.config.vocab_size, maskgit.group
    offset = torch.arange(group) * (V + 1)
    with torch.no_grad():
        for i in range(0, len(frames), batch):
            latent = tokenizer.encode_latent(torch.from_numpy(frames[i : i + batch]))  # (B, C, g, g)
            _, codes = tokenizer.quantize(latent)  # (B, g, g)
            cells = latent.permute(0, 2, 3, 1).flatten(1, 2)  # (B, G, C)
            xs.append((mar._latent_slots(cells) * mar.config.latent_scale).flatten(0, 1))
            ys.append(maskgit.tok_emb(maskgit._to_slots(codes.flatten(1)) + offset).sum(-2).flatten(0, 1))
    return torch.cat(xs), torch.cat(ys)


def fit_latent_in(mar: HMA, x: torch.Tensor, y: torch.Tensor, steps: int = 2000, batch: int = 1024,
                  lr: float = 3e-3, seed: int = 0) -> dict[str, float]:
    """Fit ``mar.latent_in`` to map x (M, p*p*C) to y (M, D) (MSE, Adam, 1/5 of the pairs held out).
    Returns the held-out R^2 before and after."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    n = len(x) * 4 // 5
    tr, te = perm[:n], perm[n:]
    layer = mar.latent_in

    def r2() -> float:
        with torch.no_grad():
            res = y[te] - layer(x[te])
            return float(1 - res.pow(2).sum() / (y[te] - y[te].mean(0)).pow(2).sum())

    before = r2()
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = tr[torch.randint(0, n, (batch,), generator=gen)]
        loss = (layer(x[idx]) - y[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return {"latent_in_r2_before": before, "latent_in_r2": r2(), "pairs": len(x)}
