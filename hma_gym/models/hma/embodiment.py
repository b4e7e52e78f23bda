"""Per-robot stems and heads, and the routing of a batch's rows to them.

Each embodiment (robot) has its own action stem (a_{t-1} -> action tokens + adaLN conditioning), state
stem, action head and state head, so one trunk serves robots with different action and state sizes; a
batch may mix them. Inputs are zero-padded to the widest robot; outputs are zero beyond each row's own
size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hma_gym.models.hma.config import EmbodimentSpec, check_embodiment_name
from hma_gym.models.hma.layers import MLP, init_weights

Groups = list[tuple[str, Tensor]]
"""(embodiment name, its row indices in the batch) for each embodiment present in a batch."""


class ActionStem(nn.Module):
    """a_{t-1} (..., action_dim) -> action tokens (..., n_tokens, D) and adaLN conditioning (..., D)."""

    def __init__(self, action_dim: int, d_model: int, n_tokens: int):
        super().__init__()
        self.n_tokens = n_tokens
        self.to_tokens = MLP(action_dim, d_model, n_tokens * d_model)
        self.to_cond = MLP(action_dim, d_model, d_model)

    def forward(self, a: Tensor) -> tuple[Tensor, Tensor]:
        return self.to_tokens(a).unflatten(-1, (self.n_tokens, -1)), self.to_cond(a)


class EmbodimentModules(nn.Module):
    """Everything one robot owns: action stem, state stem, action head, state head."""

    def __init__(self, spec: EmbodimentSpec, d_model: int, n_action_tokens: int):
        super().__init__()
        self.spec = spec
        D, n = d_model, n_action_tokens
        self.action_stem = ActionStem(spec.action_dim, D, n)
        self.state_stem = nn.Linear(spec.state_dim, D)
        self.action_norm = nn.LayerNorm(D)
        self.action_head = MLP(n * D, D, spec.action_dim)  # from the n action-token outputs
        self.state_norm = nn.LayerNorm(D)
        self.state_head = MLP(D, D, spec.state_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(init_weights)
        # paper 3.5: Xavier with gain 0.1 on the action projectors, for stability
        for layer in (self.action_stem.to_tokens.proj, self.action_stem.to_cond.proj):
            nn.init.xavier_uniform_(layer.weight, gain=0.1)

    def predict_action(self, h: Tensor) -> Tensor:
        """h: (..., n_action_tokens, D) trunk outputs -> (..., action_dim)."""
        return self.action_head(self.action_norm(h).flatten(-2))

    def predict_state(self, h: Tensor) -> Tensor:
        """h: (..., D) trunk output of the state token -> (..., state_dim)."""
        return self.state_head(self.state_norm(h))


class Embodiments(nn.ModuleDict):
    """The robots' modules by name (state-dict prefix ``embodiments.<name>.``); ids index ``names``."""

    def __init__(self, specs: dict[str, EmbodimentSpec], d_model: int, n_action_tokens: int):
        super().__init__()
        self.d_model, self.n_action_tokens = d_model, n_action_tokens
        for name, spec in specs.items():
            self[name] = EmbodimentModules(spec, d_model, n_action_tokens)

    @property
    def names(self) -> list[str]:
        """Sorted embodiment names; ``embodiment_ids`` index this list."""
        return sorted(self.keys())

    def add(self, name: str, spec: EmbodimentSpec, like: Tensor) -> None:
        """A new robot's stems and heads, on ``like``'s device and dtype."""
        check_embodiment_name(name)
        if name in self:
            raise ValueError(f"embodiment {name!r} already exists")
        self[name] = EmbodimentModules(spec, self.d_model, self.n_action_tokens).to(like.device, like.dtype)

    def max_dim(self, kind: str) -> int:
        """The widest ``action_dim`` or ``state_dim`` (kind) over the robots: the padded width."""
        return max((getattr(m.spec, kind) for m in self.values()), default=0)

    def groups(self, embodiment_ids: Tensor) -> Groups:
        """(name, row indices) for each embodiment present in the batch."""
        names = self.names
        if not names:
            raise ValueError("the model has no embodiments; add one with add_embodiment(name, spec)")
        groups = []
        for k in embodiment_ids.unique().tolist():
            if not 0 <= k < len(names):
                raise ValueError(f"embodiment id {k} out of range for {names}")
            groups.append((names[k], (embodiment_ids == k).nonzero().squeeze(1)))
        return groups

    def dim_mask(self, embodiment_ids: Tensor, kind: str, width: int) -> Tensor:
        """(B, width) bool: the real (unpadded) action or state dims (kind) of each row's embodiment."""
        dims = torch.tensor([getattr(self[n].spec, kind) for n in self.names], device=embodiment_ids.device)
        return torch.arange(width, device=embodiment_ids.device) < dims[embodiment_ids][:, None]

    def embed_actions(self, groups: Groups, actions: Tensor) -> tuple[Tensor, Tensor]:
        """actions (B, F, A) padded -> action tokens (B, F, n, D), conditioning (B, F, D)."""

        def fn(name: str, rows: Tensor) -> tuple[Tensor, ...]:
            stem = self[name].action_stem
            a = self._own(actions.index_select(0, rows), name, "action_dim")
            return stem(a.to(stem.to_cond.fc.weight.dtype))

        tokens, cond = self._by_embodiment(groups, actions.shape[0], fn)
        return tokens, cond

    def embed_states(self, groups: Groups, states: Tensor) -> Tensor:
        """states (B, F, S) padded -> (B, F, D)."""

        def fn(name: str, rows: Tensor) -> tuple[Tensor, ...]:
            stem = self[name].state_stem
            return (stem(self._own(states.index_select(0, rows), name, "state_dim").to(stem.weight.dtype)),)

        return self._by_embodiment(groups, states.shape[0], fn)[0]

    def predict_actions(self, groups: Groups, h: Tensor, width: int) -> Tensor:
        """h (B, F, n, D) action-token outputs -> (B, F, width), zero beyond each embodiment's action_dim."""

        def fn(name: str, rows: Tensor) -> tuple[Tensor, ...]:
            a = self[name].predict_action(h.index_select(0, rows))
            return (F.pad(a, (0, width - a.shape[-1])),)

        return self._by_embodiment(groups, h.shape[0], fn)[0]

    def predict_states(self, groups: Groups, h: Tensor, width: int) -> Tensor:
        """h (B, F, D) state-token outputs -> (B, F, width), zero beyond each embodiment's state_dim."""

        def fn(name: str, rows: Tensor) -> tuple[Tensor, ...]:
            s = self[name].predict_state(h.index_select(0, rows))
            return (F.pad(s, (0, width - s.shape[-1])),)

        return self._by_embodiment(groups, h.shape[0], fn)[0]

    def _own(self, x: Tensor, name: str, kind: str) -> Tensor:
        """x (..., width) padded -> (..., dim) of embodiment ``name`` (kind: action_dim or state_dim)."""
        dim = getattr(self[name].spec, kind)
        if x.shape[-1] < dim:
            raise ValueError(f"{kind} of embodiment {name!r} is {dim}, but the input is only {x.shape[-1]} wide")
        return x[..., :dim]

    @staticmethod
    def _by_embodiment(groups: Groups, batch_size: int, fn: Callable[[str, Tensor], tuple[Tensor, ...]],
                       ) -> list[Tensor]:
        """Run fn(name, rows) for each embodiment's rows and scatter its outputs back into batch order."""
        if len(groups) == 1 and len(groups[0][1]) == batch_size:  # one robot: rows are 0..B-1 in order
            return list(fn(*groups[0]))
        outs: list[Tensor] = []
        for name, rows in groups:
            ys = fn(name, rows)
            if not outs:
                outs = [y.new_zeros(batch_size, *y.shape[1:]) for y in ys]
            outs = [o.index_copy(0, rows, y.to(o.dtype)) for o, y in zip(outs, ys, strict=True)]
        return outs
