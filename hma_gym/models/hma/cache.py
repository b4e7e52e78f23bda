"""The key/value cache of generation: each layer's temporal keys and values over a sliding window of frames."""

from __future__ import annotations

import torch
from torch import Tensor

from hma_gym.models.hma.config import HMAConfig


class HMACache:
    """Temporal key/value ring buffer for each layer, over the last ``window`` frames of every batch row.

    ``k[l]``, ``v[l]``: (B, N, H, window, head_dim). ``pos`` (B,): absolute index of each row's next
    frame (frames appended since its last reset), used for RoPE and for the ring slot ``pos % window``.
    Keys are stored already rotated, so slot order does not matter. Create with ``HMA.new_cache``.
    """

    def __init__(self, k: list[Tensor], v: list[Tensor], pos: Tensor):
        self.k, self.v, self.pos = k, v, pos

    @classmethod
    def empty(cls, config: HMAConfig, batch_size: int, device: torch.device | str, dtype: torch.dtype) -> HMACache:
        """A cache for ``batch_size`` rows holding the last ``max_frames - 1`` frames of each."""
        c = config
        # zeros, not empty: masked-out slots are multiplied by probability 0 and must not hold NaNs
        shape = (batch_size, c.tokens_per_frame, c.n_head, c.max_frames - 1, c.d_model // c.n_head)
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.n_layer)]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(c.n_layer)]
        return cls(k, v, torch.zeros(batch_size, dtype=torch.long, device=device))

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    @property
    def window(self) -> int:
        return self.k[0].shape[3]

    @property
    def length(self) -> Tensor:
        """(B,) number of cached frames of each row (at most ``window``)."""
        return self.pos.clamp(max=self.window)

    def valid(self) -> Tensor:
        """(B, window) bool: which ring slots hold a frame of the row's current episode."""
        slots = torch.arange(self.window, device=self.pos.device)
        return slots[None, :] < self.length[:, None]

    def reset(self, mask: Tensor | None = None) -> None:
        """Forget the history of the rows where ``mask`` (B,) bool is True (all rows if None).

        Their keys and values are zeroed too: attention gives a forgotten slot probability 0, but
        0 * NaN is NaN, so a NaN left by an earlier episode would otherwise poison every later one."""
        if mask is None:
            self.pos.zero_()
            for t in self.k + self.v:
                t.zero_()
        else:
            mask = mask.to(self.pos.device, torch.bool)
            self.pos.masked_fill_(mask, 0)
            for t in self.k + self.v:
                t[mask] = 0

    def push(self, kv: list[tuple[Tensor, Tensor]], rows: Tensor | None = None) -> None:
        """Store one new frame per row: kv[l] = (k, v), each (B, N, H, 1, hd).

        ``rows`` (B,) bool: store only these rows' frames (the others keep their history unchanged).
        """
        index = torch.arange(self.batch_size, device=self.pos.device)
        if rows is not None:
            index = index[rows.to(self.pos.device, torch.bool)]
            kv = [(k[index], v[index]) for k, v in kv]
        self.push_rows(kv, index)

    def push_rows(self, kv: list[tuple[Tensor, Tensor]], index: Tensor) -> None:
        """Store one new frame for each of the rows ``index`` (R,) long: kv[l] = (k, v), each (R, N, H, 1, hd)."""
        slot = self.pos[index] % self.window  # (R,)
        for layer, (k, v) in enumerate(kv):
            self.k[layer][index, :, :, slot] = k[..., 0, :].to(self.k[layer].dtype)
            self.v[layer][index, :, :, slot] = v[..., 0, :].to(self.v[layer].dtype)
        self.pos[index] += 1

    def select(self, index: Tensor) -> HMACache:
        """A cache of the rows ``index`` (R,) long only (a copy: pushing to it leaves this one unchanged)."""
        return HMACache([k[index] for k in self.k], [v[index] for v in self.v], self.pos[index])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
