"""Image heads: how the image of a frame enters the trunk and how it is predicted from the trunk's output.

A frame's image is G = grid**2 tokens, discrete codes (long) or continuous latents (..., C), grouped
p x p into S = (grid / p)**2 trunk tokens ("slots"). Every head has the same interface:

- ``embed(tokens, mask)``: tokens (..., G) codes or (..., G, C) latents, mask (..., G) bool ([MASK]) ->
  trunk inputs (..., S, D);
- ``loss(z, tokens, mask)``: z (..., S, D) the normalised trunk outputs of the image slots -> the loss on
  the masked tokens and its metrics (training);
- ``sample(z, frame, known, ...)``: one unmasking pass of generation: fills in some of the still unknown
  ``units`` of ``frame`` (image tokens for a code head, slots for the diffusion head).

Three heads implement it: ``CodeHead`` (one softmax over the codebook, MaskGIT), ``FactorizedHead``
(one softmax per FSQ channel, for large codebooks) and ``DiffusionHead`` (a per-token diffusion MLP on
continuous latents, MAR's DiffLoss).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hma_gym.models.hma.config import HMAConfig
from hma_gym.models.hma.layers import MLP, init_weights, modulate
from hma_gym.models.tokenizer import fsq_codes_to_index, index_to_codes


def sample_image_mask(
    shape: tuple[int, ...],
    n_tokens: int,
    min_ratio: float,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """MaskGIT training mask: per entry of ``shape`` draw r ~ U(0, 1), mask ratio max(min_ratio, cos(pi/2 r)).

    Returns ``mask`` (*shape, n_tokens) bool (a uniformly random subset of ceil(ratio * n_tokens) tokens,
    at least one) and ``ratio`` (*shape,).
    """
    r = torch.rand(shape, device=device, generator=generator)
    ratio = torch.cos(0.5 * math.pi * r).clamp(min=min_ratio, max=1.0)
    n_masked = (ratio * n_tokens).ceil().clamp(1, n_tokens)  # (*shape)
    noise = torch.rand((*shape, n_tokens), device=device, generator=generator)
    rank = noise.argsort(dim=-1).argsort(dim=-1)  # a random permutation per entry
    return rank < n_masked[..., None], ratio


def sample_categorical(probs: Tensor, generator: torch.Generator | None = None, order: Tensor | None = None) -> Tensor:
    """One draw from each row of probs (N, V) (non-negative, rows need not sum to 1) -> (N,) long.

    Inverse-CDF sampling: one uniform per row against the row's cumulative sums. The same distribution
    as ``torch.multinomial(probs, 1)``, which on CPU draws an exponential variate for every entry of
    every row (N x V of them) and was a fifth of a learned-env step; this draws N. The cumulative sum
    runs in two levels (over blocks of about sqrt(V) entries, then within the chosen block), which
    picks the same index as one cumulative sum over V up to float rounding at ~10x fewer serial adds.
    order (N,) long: row i is the order[i]-th of the N draws (the uniforms are drawn in draw order), so
    rows handed over permuted get the uniforms they would get unpermuted.
    """
    probs = probs.float()
    N, V = probs.shape
    u = torch.rand(N, 1, device=probs.device, generator=generator)
    if order is not None:
        u = u[order]
    size = _block_size(V)
    n_blocks = -(-V // size)
    if n_blocks * size != V:
        probs = F.pad(probs, (0, n_blocks * size - V))
    blocks = probs.reshape(N, n_blocks, size)
    block_mass = blocks.sum(-1)  # (N, n_blocks)
    block_cdf = block_mass.cumsum(-1)
    u = u * block_cdf[:, -1:]
    # the first block whose cumulative mass exceeds u, then the first entry of it whose running sum
    # exceeds what is left of u: index i with probability probs[i] / sum
    b = torch.searchsorted(block_cdf, u, right=True).clamp_(max=n_blocks - 1)  # (N, 1)
    inner = blocks[torch.arange(N, device=probs.device), b[:, 0]].cumsum(-1)  # (N, size)
    # rounding can put the rest of u just outside [0, the block's sum): keep it inside, so only an
    # entry of positive probability can be picked
    rest = (u - (block_cdf.gather(1, b) - block_mass.gather(1, b))).clamp_(min=0)
    rest = torch.minimum(rest, inner[:, -1:] * (1 - 2**-20))
    j = torch.searchsorted(inner, rest, right=True).clamp_(max=size - 1)
    return (b * size + j).squeeze(-1)


def _block_size(V: int) -> int:
    """Block length of sample_categorical's two-level sum: a divisor of V near sqrt(V) (no padding),
    else sqrt(V) rounded up."""
    root = math.isqrt(V)
    for size in range(root, max(root // 2, 1) - 1, -1):
        if V % size == 0 and size > 1:
            return size
    return max(root + (root * root < V), 1)


class PatchGrid:
    """Row-major image tokens of a g x g grid, grouped p x p into S = (g / p)**2 slots (trunk tokens)."""

    def __init__(self, grid: int, patch_size: int):
        self.g, self.p = grid, patch_size
        self.n_tokens, self.n_slots, self.group = grid * grid, (grid // patch_size) ** 2, patch_size**2

    def to_slots(self, x: Tensor) -> Tensor:
        """(..., g*g) row-major image tokens -> (..., S, p*p) grouped by patch."""
        g, p = self.g, self.p
        lead = x.shape[:-1]
        x = x.reshape(*lead, g // p, p, g // p, p).transpose(-3, -2)  # (..., g/p, g/p, p, p)
        return x.reshape(*lead, self.n_slots, self.group)

    def from_slots(self, x: Tensor) -> Tensor:
        """(..., S, p*p, V) per-patch outputs -> (..., g*g, V) in row-major token order."""
        g, p = self.g, self.p
        lead, V = x.shape[:-3], x.shape[-1]
        x = x.reshape(*lead, g // p, g // p, p, p, V).transpose(-4, -3)  # (..., g/p, p, g/p, p, V)
        return x.reshape(*lead, g * g, V)

    def cells_to_slots(self, x: Tensor) -> Tensor:
        """(..., g*g, C) row-major latent cells -> (..., S, p*p*C) one vector per slot."""
        return self.to_slots(x.movedim(-1, -2)).movedim(-3, -1).flatten(-2)  # (..., S, p*p, C) -> flat

    def slots_to_cells(self, x: Tensor) -> Tensor:
        """Inverse of ``cells_to_slots``: (..., S, p*p*C) -> (..., g*g, C)."""
        return self.from_slots(x.unflatten(-1, (self.group, -1)))

    def slot_to_token_mask(self, slot_mask: Tensor) -> Tensor:
        """(..., S) bool per slot -> (..., g*g) bool per image token."""
        return self.from_slots(slot_mask[..., None, None].expand(*slot_mask.shape, self.group, 1))[..., 0]


class ImageHead(nn.Module):
    """The interface of the image heads (see the module docstring)."""

    units: int
    """What one unmasking pass reveals, per frame: image tokens (G) or slots (S)."""
    token_shape: tuple[int, ...]
    """The trailing shape of one image token: () for a code, (C,) for a latent."""

    def __init__(self, config: HMAConfig):
        super().__init__()
        self.grid = PatchGrid(config.grid, config.patch_size)

    def embed(self, tokens: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def sample_mask(self, shape: tuple[int, ...], min_ratio: float, device: torch.device | str | None) -> Tensor:
        """A training mask (*shape, G) bool: MaskGIT's cosine schedule over the head's units."""
        raise NotImplementedError

    def loss(self, z: Tensor, tokens: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def blank(self, batch_size: int, device: torch.device | str) -> Tensor:
        """A frame to generate, all unknown: codes (B, G) or latents (B, G, C) of zeros."""
        return torch.zeros(batch_size, self.grid.n_tokens, *self.token_shape,
                           dtype=torch.float32 if self.token_shape else torch.long, device=device)

    def token_mask(self, unknown: Tensor) -> Tensor:
        """(B, units) bool per unit -> (B, G) bool per image token."""
        return unknown

    def entropy(self, z: Tensor) -> Tensor | None:
        """z (B, S, D) -> (B,): the mean entropy of the image tokens' predicted distributions over their codes,
        as a fraction of the most a token can have (log of the codebook size): 0 = certain, 1 = uniform. None
        where the head has no distribution over codes (diffusion)."""
        return None

    def sample(
        self, z: Tensor, frame: Tensor, known: Tensor, n_known: tuple[int, int], order: Tensor | None,
        temperature: float, generator: torch.Generator | None, greedy: bool, diffusion_steps: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One unmasking pass: z (B, S, D) normalised image-slot outputs of a pass over ``frame`` (B, G[, C])
        whose ``known`` (B, units) units are given; ``n_known``: how many units each row knows before and
        after this pass; ``order`` (B, units): the rank at which each unit is revealed (None if greedy).
        Returns the frame with the newly revealed units filled in, and which units those are (B, units)."""
        raise NotImplementedError


class CodeHead(ImageHead):
    """Discrete codes, one softmax over the codebook per image token (MaskGIT).

    A slot embeds as the sum of its p*p codes' rows (one table per position in the patch, whose last
    row is [MASK]) and predicts all p*p codes: ``proj`` gives p*p blocks of ``classes`` logits."""

    token_shape = ()

    def __init__(self, config: HMAConfig):
        super().__init__(config)
        self.units, self.vocab_size = self.grid.n_tokens, config.vocab_size
        self.classes = config.head_classes  # logits per image token
        D, group = config.d_model, self.grid.group
        self.tok_emb = nn.Embedding(group * (self.classes + 1), D)
        self.proj = nn.Linear(D, group * self.classes)
        self.apply(init_weights)
        # the slot and the position inside it of every image token, for the sampler's gathers
        where = self.grid.to_slots(torch.arange(self.units))  # (S, p*p): token index at (slot, position)
        slot_of, sub_of = torch.empty(self.units, dtype=torch.long), torch.empty(self.units, dtype=torch.long)
        slot_of[where.flatten()] = torch.arange(self.grid.n_slots).repeat_interleave(group)
        sub_of[where.flatten()] = torch.arange(group).repeat(self.grid.n_slots)
        self.register_buffer("slot_of", slot_of, persistent=False)
        self.register_buffer("sub_of", sub_of, persistent=False)

    def embed(self, tokens: Tensor, mask: Tensor) -> Tensor:
        V = self.vocab_size
        codes = self.grid.to_slots(tokens.masked_fill(mask, V))  # (..., S, p*p), V = [MASK]
        offset = torch.arange(self.grid.group, device=tokens.device) * (V + 1)
        return self.tok_emb(codes + offset).sum(-2)  # (..., S, D)

    def mask_embedding(self) -> Tensor:
        """(D,): what a slot whose every token is [MASK] embeds to."""
        return self.tok_emb.weight[torch.arange(self.grid.group) * (self.classes + 1) + self.classes].sum(0)

    def sample_mask(self, shape: tuple[int, ...], min_ratio: float, device: torch.device | str | None) -> Tensor:
        return sample_image_mask(shape, self.units, min_ratio, device=device)[0]

    def logits(self, z: Tensor) -> Tensor:
        """z (..., S, D) -> the head's outputs per image token (..., G, classes)."""
        return self.grid.from_slots(self.proj(z).unflatten(-1, (self.grid.group, self.classes)))

    def code_logits(self, z: Tensor) -> Tensor:
        """z (..., S, D) -> logits of every code (..., G, vocab_size)."""
        return self.logits(z)

    def loss(self, z: Tensor, tokens: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy on the masked codes: z (B, T, S, D), tokens (B, T, G), mask (B, T, G)."""
        if self.grid.group == 1:  # a slot is a token: only the masked ones need logits
            logits = self.proj(z[mask]).float()  # (M, classes)
        else:
            logits = self.logits(z)[mask].float()  # (M, classes)
        ce, accuracy = self.cross_entropy(logits, tokens[mask])
        return ce, {"ce": ce, "accuracy": accuracy}

    def cross_entropy(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """logits (M, classes), target codes (M,) -> (cross-entropy, accuracy of the argmax code)."""
        return F.cross_entropy(logits, target), (logits.argmax(-1) == target).float().mean()

    def entropy(self, z: Tensor) -> Tensor:
        return _entropy(self.logits(z), self.vocab_size)

    def draw(self, logits: Tensor, temperature: float, generator: torch.Generator | None, order: Tensor | None,
             greedy: bool) -> tuple[Tensor, Tensor | None]:
        """logits (K, classes) -> codes (K,) (argmax if greedy, else one draw each from softmax(logits /
        temperature), see ``sample_categorical`` for ``order``) and, if greedy, their log-probabilities."""
        logits = logits.float()
        if greedy:
            logp, codes = logits.log_softmax(-1).max(-1)
            return codes, logp
        probs = torch.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
        return sample_categorical(probs, generator, order=order), None

    @torch.no_grad()  # the matmuls write into one output (out=), which autograd refuses
    def token_logits(self, z: Tensor, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Outputs of chosen image tokens only: z (B, S, D); rows, cols (K,) batch row and row-major token
        index of each. -> (logits (K, classes), rows, cols, order): the tokens may come back reordered
        (rows, cols in the order of the logits; token i is the order[i]-th asked for; order None: the
        given order). The same values as ``logits(z)[rows, cols]`` without the matmul for the tokens not
        asked for (a sampler's pass needs a fraction)."""
        group, V = self.grid.group, self.classes
        slot, sub = self.slot_of[cols], self.sub_of[cols]
        weight, bias = self.proj.weight.view(group, V, -1), self.proj.bias.view(group, V)
        if group == 1:
            return F.linear(z[rows, slot], weight[0], bias[0]), rows, cols, None
        # tokens sorted by position in the patch: one matmul per position, each writing its own block of
        # the output (no concatenation, no scatter back: the caller takes the order)
        order = torch.argsort(sub, stable=True)
        rows, cols, slot = rows[order], cols[order], slot[order]
        x = z[rows, slot]  # (K, D)
        out = x.new_empty(len(cols), V)
        start = 0
        for j, count in enumerate(torch.bincount(sub, minlength=group).tolist()):
            if count:
                torch.addmm(bias[j], x[start : start + count], weight[j].t(), out=out[start : start + count])
            start += count
        return out, rows, cols, order

    @torch.no_grad()
    def sample(
        self, z: Tensor, frame: Tensor, known: Tensor, n_known: tuple[int, int], order: Tensor | None,
        temperature: float, generator: torch.Generator | None, greedy: bool, diffusion_steps: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        B, G = known.shape
        sampled = torch.zeros(B, G, dtype=torch.long, device=known.device)
        if greedy:  # the most confident masked tokens are revealed: all of them need logits
            rows, cols = (~known).nonzero(as_tuple=True)
            logits, rows, cols, _ = self.token_logits(z, rows, cols)
            confidence = torch.full((B, G), float("-inf"), device=known.device)
            sampled[rows, cols], confidence[rows, cols] = self.draw(logits, 1.0, None, None, greedy=True)
            top = confidence.topk(n_known[1] - n_known[0], dim=-1).indices
            reveal = torch.zeros_like(known).scatter_(1, top, True)
        else:  # tokens are revealed in a random order: only this pass's need logits
            reveal = (order < n_known[1]) & ~known
            rows, cols = reveal.nonzero(as_tuple=True)
            logits, rows, cols, perm = self.token_logits(z, rows, cols)
            # each token gets the uniform it would get in the order asked for (the draws do not depend on
            # how the logits were grouped)
            sampled[rows, cols] = self.draw(logits, temperature, generator, perm, greedy=False)[0]
        return torch.where(reveal, sampled, frame), reveal


class FactorizedHead(CodeHead):
    """FSQ codes predicted channel by channel (``code_levels``): a code embeds as the sum of one row per
    (channel, level) and the head gives each channel's level its own softmax, sum(levels) logits a token
    instead of prod(levels) = vocab_size; a code's probability is the product of its channels'. Keeps a
    large codebook (e.g. 8 8 8 6 5 = 15,360 codes) cheap. Each position's table holds sum(levels) rows
    plus [MASK]."""

    def __init__(self, config: HMAConfig):
        super().__init__(config)
        self.levels = tuple(config.code_levels)
        levels = torch.tensor(self.levels)
        # the first row / logit of each channel inside one position's block of sum(levels)
        self.register_buffer("level_offset", levels.cumsum(0) - levels, persistent=False)

    def embed(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """codes (..., G), mask (..., G) -> (..., S, D); a code's embedding is the sum of its channels' level
        rows, a [MASK] token's the position's mask row."""
        L = self.classes
        digits = index_to_codes(tokens.masked_fill(mask, 0), self.levels)  # (..., G, C)
        sub = torch.arange(self.grid.group, device=tokens.device)[:, None] * (L + 1)  # (p*p, 1)
        rows = self.grid.to_slots((digits + self.level_offset).movedim(-1, -2)).movedim(-3, -1) + sub
        emb = self.tok_emb(rows).sum(-2)  # (..., S, p*p, D)
        emb = torch.where(self.grid.to_slots(mask)[..., None], self.tok_emb(sub[:, 0] + L), emb)
        return emb.sum(-2)

    def code_logits(self, z: Tensor) -> Tensor:
        """z (..., S, D) -> log-probabilities of every code (..., G, vocab_size), valid logits."""
        return self.log_probs(self.logits(z))

    def log_probs(self, logits: Tensor) -> Tensor:
        """Per-channel logits (..., sum(levels)) -> log-probabilities of every code (..., V), the sum of each
        channel's log-softmax at the code's level."""
        out = None
        for c, part in enumerate(logits.float().split(list(self.levels), dim=-1)):  # channel c is digit c
            lp = part.log_softmax(-1)
            lp = lp.view(*lp.shape[:-1], *([1] * (len(self.levels) - 1 - c)), self.levels[c], *([1] * c))
            out = lp if out is None else out + lp
        return out.flatten(-len(self.levels))  # the last channel varies slowest: index = d0 + L0 * (d1 + ...)

    def entropy(self, z: Tensor) -> Tensor:
        # a product distribution's entropy is the sum of its factors'
        parts = self.logits(z).split(list(self.levels), dim=-1)
        return sum(_entropy(p, self.vocab_size) for p in parts)

    def cross_entropy(self, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """The code's cross-entropy (the sum of the channels'), and the accuracy of the per-channel argmax."""
        digits = index_to_codes(target, self.levels)  # (M, C)
        parts = logits.split(list(self.levels), dim=-1)
        ce = sum(F.cross_entropy(p, digits[:, c]) for c, p in enumerate(parts))
        argmax = torch.stack([p.argmax(-1) for p in parts], dim=-1)
        return ce, (argmax == digits).all(-1).float().mean()

    def draw(self, logits: Tensor, temperature: float, generator: torch.Generator | None, order: Tensor | None,
             greedy: bool) -> tuple[Tensor, Tensor]:
        """Each channel's level from its own softmax (one uniform per token and channel, drawn channel after
        channel in ``order``), or its argmax if greedy: codes (K,) and their log-probabilities."""
        digits, logp = [], torch.zeros(len(logits), device=logits.device)
        for part in logits.float().split(list(self.levels), dim=-1):
            lp = part.log_softmax(-1)
            if greedy:
                d = lp.argmax(-1)
            else:
                probs = torch.softmax(part if temperature == 1.0 else part / temperature, dim=-1)
                d = sample_categorical(probs, generator, order=order)
            digits.append(d)
            logp = logp + lp.gather(1, d[:, None])[:, 0]
        return fsq_codes_to_index(torch.stack(digits, dim=-1), self.levels), logp


def _entropy(logits: Tensor, vocab_size: int) -> Tensor:
    """logits (B, G, K) -> (B,): mean over G of each softmax's entropy, divided by log(vocab_size)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean(-1) / math.log(vocab_size)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of diffusion steps t (K,) -> (K, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs
    return torch.cat([args.cos(), args.sin(), torch.zeros_like(args[:, : dim % 2])], dim=-1)


class DiffusionMLP(nn.Module):
    """MAR's per-token denoiser: noisy token x_t (K, dim), step t (K,), trunk output z (K, cond_dim) ->
    predicted noise (K, dim). Residual MLP blocks, each modulated (adaLN-Zero) by embed(t) + proj(z)."""

    def __init__(self, dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.width = width
        self.inp = nn.Linear(dim, width)
        self.t_emb = MLP(width, width, width)
        self.c_emb = nn.Linear(cond_dim, width)
        self.norms = nn.ModuleList([nn.LayerNorm(width, elementwise_affine=False, eps=1e-6) for _ in range(depth)])
        self.mlps = nn.ModuleList([MLP(width, width, width) for _ in range(depth)])
        self.ada = nn.ModuleList([nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width)) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, dim)

    def zero_init(self) -> None:
        for ada in [*self.ada, self.final_ada]:
            nn.init.zeros_(ada[-1].weight)
            nn.init.zeros_(ada[-1].bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor, z: Tensor | None = None, z_emb: Tensor | None = None) -> Tensor:
        """``z_emb = c_emb(z)`` may be given instead of z (a sampler computes it once for all its steps); t may
        be (1,) for a step shared by every row."""
        c = self.t_emb(timestep_embedding(t, self.width).to(x.dtype)) + (self.c_emb(z) if z_emb is None else z_emb)
        h = self.inp(x)
        for norm, mlp, ada in zip(self.norms, self.mlps, self.ada, strict=True):
            shift, scale, gate = ada(c).chunk(3, dim=-1)
            h = h + gate * mlp(modulate(norm(h), shift, scale))
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        return self.out(modulate(self.final_norm(h), shift, scale))


class LatticeTable(nn.Module):
    """FSQ latents embedded as the code they round to: one table row per (position in a patch, code), a
    patch embedding the sum of its positions' rows, exactly as a MaskGIT trunk embeds a patch of codes.
    Row ``j * prod(levels) + code`` for position j; codes in the tokenizer's order (``fsq_codes_to_index``)."""

    def __init__(self, levels: tuple[int, ...], group: int, d_model: int):
        super().__init__()
        self.levels, self.group = tuple(levels), group
        self.n_codes = math.prod(levels)
        self.table = nn.Embedding(group * self.n_codes, d_model)
        lv = torch.tensor(levels)
        self.register_buffer("zero_digit", torch.div(lv, 2, rounding_mode="floor").float(), persistent=False)
        self.register_buffer("top_digit", (lv - 1).float(), persistent=False)
        self.register_buffer("position_offset", torch.arange(group) * self.n_codes, persistent=False)  # (group,)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., group, C) latents in level units (FSQ: digit = latent + levels // 2) -> (..., D)."""
        digits = (torch.round(x.float()) + self.zero_digit).clamp(min=torch.zeros_like(self.top_digit),
                                                                    max=self.top_digit)
        rows = fsq_codes_to_index(digits, self.levels) + self.position_offset  # (..., group)
        return self.table(rows).sum(-2)


class DiffusionHead(ImageHead):
    """Continuous latents predicted by a per-token diffusion MLP conditioned on the trunk
    output (MAR's DiffLoss): ``loss`` is the noise-prediction MSE (DDPM noising, diffusers), ``sample``
    runs DDIM. A slot is the unit: it embeds its p*p latent cells (one linear layer, or ``latent_levels``'
    lattice table) or, if any of them is masked, the learned [MASK] vector; the head denoises all p*p*C
    numbers at once. Latents enter the diffusion MLP multiplied by ``latent_scale``."""

    def __init__(self, config: HMAConfig):
        super().__init__(config)
        self.units, self.token_shape = self.grid.n_slots, (config.latent_dim,)
        self.scale, self.lattice = config.latent_scale, bool(config.latent_levels)
        self.train_steps, self.sample_steps = config.diff_train_steps, config.diff_sample_steps
        self.batch_mul = config.diff_batch_mul
        D, dim = config.d_model, self.grid.group * config.latent_dim
        if self.lattice:
            self.latent_in = LatticeTable(config.latent_levels, self.grid.group, D)
        else:
            self.latent_in = nn.Linear(dim, D)
        self.mask_emb = nn.Parameter(torch.zeros(D))
        self.net = DiffusionMLP(dim, D, config.diff_width, config.diff_depth)
        self.apply(init_weights)
        nn.init.normal_(self.mask_emb, std=0.02)
        self.net.zero_init()
        self._schedulers: dict[str, object] = {}

    def embed_latents(self, latents: Tensor) -> Tensor:
        """latents (..., G, C) in level units -> one embedding per slot (..., S, D)."""
        slots = self.grid.cells_to_slots(latents)  # (..., S, p*p*C)
        if self.lattice:
            return self.latent_in(slots.unflatten(-1, (self.grid.group, -1))).to(self.mask_emb.dtype)
        return self.latent_in((slots * self.scale).to(self.mask_emb.dtype))

    def embed(self, tokens: Tensor, mask: Tensor) -> Tensor:
        slot_mask = self.grid.to_slots(mask).any(-1)  # (..., S): a slot is [MASK] if any of its cells is
        img = self.embed_latents(tokens)  # (..., S, D)
        return torch.where(slot_mask[..., None], self.mask_emb.to(img.dtype), img)

    def sample_mask(self, shape: tuple[int, ...], min_ratio: float, device: torch.device | str | None) -> Tensor:
        return self.grid.slot_to_token_mask(sample_image_mask(shape, self.units, min_ratio, device=device)[0])

    def token_mask(self, unknown: Tensor) -> Tensor:
        return self.grid.slot_to_token_mask(unknown)

    def scheduler(self, kind: str, sample_steps: int | None = None):
        """diffusers' DDPM (training: noising) or DDIM (sampling) scheduler of this head's noise schedule."""
        key = f"{kind}{sample_steps or ''}"
        if key not in self._schedulers:
            from diffusers import DDIMScheduler, DDPMScheduler

            kw = dict(num_train_timesteps=self.train_steps, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                      prediction_type="epsilon")
            if kind == "ddpm":
                self._schedulers[key] = DDPMScheduler(**kw)
            else:
                sched = DDIMScheduler(**kw)
                sched.set_timesteps(sample_steps)
                self._schedulers[key] = sched
        return self._schedulers[key]

    def loss(self, z: Tensor, tokens: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Noise-prediction MSE on the masked slots, ``diff_batch_mul`` noise draws each: z (B, T, S, D),
        latents (B, T, G, C), mask (B, T, G)."""
        slot_mask = self.grid.to_slots(mask).any(-1)  # (B, T, S)
        z = z[slot_mask]  # (M, D)
        x0 = (self.grid.cells_to_slots(tokens)[slot_mask] * self.scale).to(z.dtype)  # (M, p*p*C)
        z, x0 = z.repeat(self.batch_mul, 1), x0.repeat(self.batch_mul, 1)
        t = torch.randint(0, self.train_steps, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        alphas = self.scheduler("ddpm").alphas_cumprod.to(device=x0.device, dtype=torch.float32)[t][:, None]
        xt = (alphas.sqrt() * x0.float() + (1 - alphas).sqrt() * noise.float()).to(x0.dtype)
        mse = F.mse_loss(self.net(xt, t, z).float(), noise.float())
        return mse, {"diff_mse": mse}

    @torch.no_grad()
    def denoise(self, z: Tensor, steps: int, temperature: float, generator: torch.Generator | None,
                greedy: bool) -> Tensor:
        """DDIM (eta 0) from noise of std ``temperature`` (zero noise if greedy), conditioned on z (K, D) ->
        scaled latents (K, p*p*C)."""
        sched = self.scheduler("ddim", steps)
        dim = self.net.out.out_features
        if greedy:
            x = z.new_zeros(len(z), dim, dtype=torch.float32)
        else:
            x = torch.randn(len(z), dim, device=z.device, generator=generator) * temperature
        z_emb = self.net.c_emb(z)  # the condition is the same at every step
        for t in sched.timesteps:
            eps = self.net(x.to(z.dtype), t.to(z.device).reshape(1), z_emb=z_emb).float()
            x = sched.step(eps, t, x).prev_sample
        return x

    @torch.no_grad()
    def sample(
        self, z: Tensor, frame: Tensor, known: Tensor, n_known: tuple[int, int], order: Tensor | None,
        temperature: float, generator: torch.Generator | None, greedy: bool, diffusion_steps: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Denoise the slots this pass reveals (greedy: in slot order, from zero noise); ``diffusion_steps``:
        DDIM steps (default ``diff_sample_steps``)."""
        B, S = known.shape
        if order is None:
            order = torch.arange(S, device=known.device).expand(B, S)
        reveal = (order < n_known[1]) & ~known
        rows, cols = reveal.nonzero(as_tuple=True)
        x = self.denoise(z[rows, cols], diffusion_steps or self.sample_steps, temperature, generator, greedy)
        slots = self.grid.cells_to_slots(frame)  # (B, S, p*p*C)
        slots[rows, cols] = (x / self.scale).to(slots.dtype)
        return self.grid.slots_to_cells(slots), reveal


def make_image_head(config: HMAConfig) -> ImageHead:
    """The image head a config asks for."""
    if config.head == "mar":
        return DiffusionHead(config)
    return FactorizedHead(config) if config.code_levels else CodeHead(config)
