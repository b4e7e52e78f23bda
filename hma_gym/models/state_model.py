"""The world model's low-dimensional dynamics: robot proprio + the task's object state, one step at a time.

The image trunk (`hma_gym.models.hma`) sees the scene; this model carries the numbers a verdict is made of.
Each step maps the state s_t, its last change s_t - s_{t-1}, the action a_t and the previous action to the
next state s_{t+1}:

- every dim gets a regressed change (normalised by the spread of that dim's one-step changes in the data);
- the object's own pose (for Lift: the cube's position and quaternion) moves only when a discrete *contact*
  output says so. Contact is a classifier of "does the object move this step", trained on the data's own
  motion (a step moves the object when its position changes by more than `rest_tolerance`). A resting object
  keeps its pose exactly, so nothing drifts while nothing touches it, and a held object moves with the
  regressed change: the model commits to one outcome per step instead of averaging "lifted" and "left
  behind" into a half-lift;
- whether a grasp holds is decided once per close: when the gripper command has been "close" for
  `grasp_steps` steps in a row, a *grasp* classifier reads the state and commits to "this close takes hold of
  the object" or not; the decision is an input of every later step until the next decision. Without it, the
  motion after a close 2-4 cm beside the cube is a regression that averages "holds" and "closes on air"
  (fingers stopped half-way, which the contact output then reads as a hold). Deciding a few steps into the
  close (the fingers are still in the air then) lets a grasp given up at once decide nothing, and lets the
  classifier see how the arm moves as the fingers close. The data's label (`grasp_labels`): the object rose
  more than `held_rise` above its lowest point so far before the next decision (lifted: fingers that only
  press on it or close beside it cannot raise it). By that definition an object that no close holds never
  rises further, and the model keeps it so (`apply_change`): without a grasp the task's success height is
  out of reach, however the regressed changes drift;
- dims that are a difference of two others (Lift: gripper-to-cube = cube - gripper) are computed from them,
  so the state stays self-consistent; quaternions are kept unit length.

Its `uncertainty` is the binary entropy of the contact decision, and where a grasp is decided the larger of that
and the grasp decision's (0 = certain, 1 = a coin flip).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

STATE_MODEL_NAME = "state_model"


def _mlp(width: int, hidden: int, layers: int) -> nn.Sequential:
    out: list[nn.Module] = []
    for _ in range(layers):
        out += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.SiLU()]
        width = hidden
    return nn.Sequential(*out)


@dataclass
class StateModelConfig:
    keys: list[tuple[str, int]]
    """(observation key, width) of the state, concatenated in this order."""
    action_dim: int = 7
    hidden: int = 256
    layers: int = 3
    object_pose: list[int] = field(default_factory=list)
    """Indices of the dims that rest unless the contact output fires (the object's own pose)."""
    object_pos: list[int] = field(default_factory=list)
    """Indices (within the state) of the object's position: its change defines a contact step in the data."""
    derived: list[tuple[int, int, int, int]] = field(default_factory=list)
    """(target, a, b, width): state[target:target+w] = state[a:a+w] - state[b:b+w]."""
    quaternions: list[int] = field(default_factory=list)
    """Start indices of 4-wide quaternions, renormalised after each step."""
    rest_tolerance: float = 2e-4
    """A step moves the object when its position changes by more than this (world units: m)."""
    held_rise: float = 0.015
    """A close command took hold of the object when the object then rose more than this (m; `grasp_labels`)."""
    regrasp_gap: int = 3
    """A close command after at most this many open steps continues the previous close (`grasp_labels`)."""
    grasp_steps: int = 1
    """The grasp is decided at this many consecutive steps of a close command (1: at the command itself)."""
    rest_height: float | None = None
    """The object's height at rest (m; `fit_statistics` in the trainer: the median of each episode's lowest
    height). Where set, an object that no close holds stays below ``rest_height + held_rise`` (`apply_change`)."""

    @property
    def state_dim(self) -> int:
        return sum(int(d) for _, d in self.keys)

    @classmethod
    def from_dict(cls, d: dict) -> StateModelConfig:
        d = dict(d)
        d["keys"] = [(str(k), int(w)) for k, w in d["keys"]]
        d["derived"] = [tuple(int(x) for x in r) for r in d.get("derived", [])]
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        return asdict(self)


class StateModel(nn.Module):
    """(s_t, s_{t-1}, a_t, a_{t-1}) raw -> s_{t+1} raw, with a committed contact decision; see the module doc."""

    def __init__(self, cfg: StateModelConfig):
        super().__init__()
        self.cfg = cfg
        S, A = cfg.state_dim, cfg.action_dim
        self.body = _mlp(2 * S + 2 * A + 1, cfg.hidden, cfg.layers)
        self.delta_head = nn.Linear(cfg.hidden, S)
        self.contact_head = nn.Linear(cfg.hidden, 1)
        self.grasp_net = nn.Sequential(_mlp(2 * S + 2 * A, cfg.hidden // 2, 2), nn.Linear(cfg.hidden // 2, 1))
        # normalisation statistics, fitted on data by the trainer (saved with the weights)
        for name, dim in (("state", S), ("delta", S), ("action", A)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))
        pose = torch.zeros(S, dtype=torch.bool)
        pose[cfg.object_pose] = True
        self.register_buffer("pose_mask", pose, persistent=False)
        derived = torch.zeros(S, dtype=torch.bool)
        for target, _, _, w in cfg.derived:
            derived[target:target + w] = True
        self.register_buffer("derived_mask", derived, persistent=False)

    def features(self, s: Tensor, s_prev: Tensor, a: Tensor, a_prev: Tensor) -> Tensor:
        x_s, x_d = (s - self.state_mean) / self.state_std, (s - s_prev - self.delta_mean) / self.delta_std
        x_a = torch.cat([(a - self.action_mean) / self.action_std, (a_prev - self.action_mean) / self.action_std], -1)
        return torch.cat([x_s, x_d, x_a], -1)

    def forward(self, x: Tensor, grasp: Tensor) -> tuple[Tensor, Tensor]:
        """Features (`features`) and the grasp decision (...) in {0, 1} -> normalised change of every dim
        (..., S), contact logit (...)."""
        h = self.body(torch.cat([x, grasp[..., None].to(x.dtype)], -1))
        return self.delta_head(h), self.contact_head(h)[..., 0]

    def grasp_logit(self, x: Tensor) -> Tensor:
        """Features -> logit of "this close takes hold of the object", read where a grasp is decided."""
        return self.grasp_net(x)[..., 0]

    def grasp_update(self, a: Tensor, closed: Tensor, grasp: Tensor, decided: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The grasp decision after action a, given the number of consecutive close commands (the gripper
        command, the last action dim, positive) before it: `decided` (...) where a close command has lasted
        `grasp_steps` steps with a, else kept. Returns the decision, the new count and where it was decided."""
        closed = torch.where(a[..., -1] > 0, closed + 1, torch.zeros_like(closed))
        point = closed == self.cfg.grasp_steps
        return torch.where(point, decided.to(grasp.dtype), grasp), closed, point

    def apply_change(self, s: Tensor, delta_norm: Tensor, contact: Tensor, grasp: Tensor) -> Tensor:
        """s (..., S) raw + a normalised change; the object's pose moves only where `contact` (...) is true
        (a float in [0, 1] blends, as the trainer's teacher forcing does). Where the grasp decision in force
        (...) is "not held", the object's height is kept below ``rest_height + held_rise``: by the grasp label's
        definition an object rises further only under a close that held it (of the 3,620 training episodes, 62
        passed it before their first grasp decision, by at most 6.7 mm, none to the Lift success height).
        Derived dims and quaternions are then made consistent."""
        change = delta_norm * self.delta_std + self.delta_mean
        gate = torch.where(self.pose_mask, contact[..., None].to(change.dtype), torch.ones_like(change))
        nxt = s + change * gate
        if self.cfg.rest_height is not None:  # an upper limit per dim: the height's, unless held
            limit = torch.full_like(nxt, torch.inf)
            limit[..., self.cfg.object_pos[-1]] = torch.where(grasp > 0.5, torch.inf,
                                                              self.cfg.rest_height + self.cfg.held_rise)
            nxt = torch.minimum(nxt, limit)
        nxt = self.make_consistent(nxt)
        # a resting pose is kept bit for bit (no drift from renormalising its quaternion)
        return torch.where(self.pose_mask & (contact[..., None] == 0), s, nxt)

    def make_consistent(self, s: Tensor) -> Tensor:
        parts = list(s.unbind(-1))
        for target, a, b, w in self.cfg.derived:
            for i in range(w):
                parts[target + i] = parts[a + i] - parts[b + i]
        out = torch.stack(parts, -1)
        for q in self.cfg.quaternions:
            quat = out[..., q:q + 4]
            unit = quat / quat.norm(dim=-1, keepdim=True).clamp(min=1e-6)
            out = torch.cat([out[..., :q], unit, out[..., q + 4:]], -1)
        return out

    @torch.no_grad()
    def step(self, s: Tensor, s_prev: Tensor, a: Tensor, a_prev: Tensor, grasp: Tensor,
             closed: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One committed step from the grasp decision in force (B,) and the count of consecutive close commands
        before a (B,) -> s_{t+1} (B, S) raw, the grasp decision and the count after this step (B,), contact
        (B,) bool, uncertainty (B,) in [0, 1]."""
        s, s_prev, a, a_prev = s.float(), s_prev.float(), a.float(), a_prev.float()
        x = self.features(s, s_prev, a, a_prev)
        p_grasp = torch.sigmoid(self.grasp_logit(x))
        grasp, closed, point = self.grasp_update(a, closed, grasp.float(), p_grasp > 0.5)
        delta, logit = self(x, grasp)
        p = torch.sigmoid(logit)
        contact = p > 0.5
        uncertainty = torch.where(point, torch.maximum(entropy(p), entropy(p_grasp)), entropy(p))
        return self.apply_change(s, delta, contact.float(), grasp), grasp, closed, contact, uncertainty

    def contact_label(self, s: Tensor, s_next: Tensor) -> Tensor:
        """The data's contact label of each step: the object's position moved more than `rest_tolerance`."""
        idx = torch.as_tensor(self.cfg.object_pos, device=s.device)
        moved = (s_next.index_select(-1, idx) - s.index_select(-1, idx)).abs().amax(-1)
        return moved > self.cfg.rest_tolerance


def entropy(p: Tensor) -> Tensor:
    """Binary entropy in bits, in [0, 1]."""
    h = -(p * p.clamp(min=1e-12).log2() + (1 - p) * (1 - p).clamp(min=1e-12).log2())
    return h.clamp(0, 1)


def grasp_labels(height: np.ndarray, command: np.ndarray, rise: float = 0.015, gap: int = 3,
                 steps: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The data's grasp decision of one episode: the object's height (L+1,) per observation and the gripper
    command (L,) per action (> 0 closes) -> the decision in force at each step (L,) float and the weight of
    the grasp classifier's label at each step (L,) float.

    A grasp is decided where a close command has lasted `steps` steps (a shorter close, e.g. a grasp given
    up at once, decides nothing). It took hold when, before the gripper is next decided again after more than
    `gap` open steps, the object rose more than `rise` above the lowest it had been so far. A close that
    follows at most `gap` open steps continues the one before (a flickering command, as a Diffusion Policy's
    sampled chunks give, does not let go of the cube): both are judged over the same span. The decision
    holds from one decision to the next (0 before the first). Weights: 1 / (number of decisions) at each
    decision, so every episode's decisions weigh as much as one (a random policy closes the gripper ~25
    times an episode, an expert once); 0 elsewhere."""
    L = len(command)
    decision, weight = np.zeros(L, np.float32), np.zeros(L, np.float32)
    closing = command > 0
    run = np.zeros(L, np.int64)  # consecutive close commands up to and including each step
    for t in range(L):
        run[t] = run[t - 1] + 1 if closing[t] and t else int(closing[t])
    points = np.flatnonzero(run == steps)
    # the end of each decision's span: the next decision after more than `gap` open steps
    regrasp = [d for i, d in enumerate(points) if i == 0 or (~closing[points[i - 1]:d]).sum() > gap]
    bounds = [*points, L]
    for d, nxt in zip(bounds[:-1], bounds[1:], strict=True):
        end = next((r for r in regrasp if r > d), L)
        decision[d:nxt] = height[d + 1 : end + 1].max() > height[: d + 1].min() + rise
    weight[points] = 1.0 / max(len(points), 1)
    return decision, weight


def rollout_loss(model: StateModel, states: Tensor, actions: Tensor, prev_state: Tensor, prev_action: Tensor,
                 valid: Tensor, grasp: Tensor, grasp_weight: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Unrolled training loss over windows: states (B, K+1, S) raw truth, actions (B, K, A), prev_state (B, S) and
    prev_action (B, A) the step before the window, valid (B, K) bool (steps inside the episode), grasp (B, K)
    the data's grasp decision in force at each step and grasp_weight (B, K) the weight of its label (> 0 where
    a grasp is decided; `grasp_labels`).

    The model runs on its own predictions for K steps (so it learns to correct its own drift), its contact
    gate and grasp decision teacher-forced by the data's labels; losses: the state error after each step in
    units of the state's spread (derived dims included, so the object's pose relative to the gripper counts),
    the normalised one-step change of the dims that move, the contact cross-entropy, and the grasp classifier's
    cross-entropy where a grasp is decided (read from the model's own state there, as at inference)."""
    s, s_prev, a_prev = states[:, 0], prev_state, prev_action
    state_terms, delta_terms, contact_terms, correct = [], [], [], []
    grasp_terms, grasp_right = [], []
    w = valid.float()
    for k in range(actions.shape[1]):
        a = actions[:, k]
        x = model.features(s, s_prev, a, a_prev)
        delta, logit = model(x, grasp[:, k])
        g_logit = model.grasp_logit(x)
        grasp_terms.append(F.binary_cross_entropy_with_logits(g_logit, grasp[:, k], reduction="none"))
        grasp_right.append(((g_logit > 0) == (grasp[:, k] > 0.5)).float())
        truth = states[:, k + 1]
        label = model.contact_label(states[:, k], truth)
        target = (truth - s - model.delta_mean) / model.delta_std  # the change that reaches the truth
        moves = torch.where(model.pose_mask, label[:, None], torch.ones_like(target, dtype=torch.bool))
        moves = moves & ~model.derived_mask
        delta_terms.append(((delta - target) ** 2 * moves).sum(-1) / moves.sum(-1).clamp(min=1))
        contact_terms.append(F.binary_cross_entropy_with_logits(logit, label.float(), reduction="none"))
        correct.append(((logit > 0) == label).float())
        nxt = model.apply_change(s, delta, label.float(), grasp[:, k])
        state_terms.append((((nxt - truth) / model.state_std) ** 2).mean(-1))
        s_prev, s, a_prev = s, nxt, a
        # a step past the episode's end restarts from the truth (its terms are masked out anyway)
        s = torch.where(valid[:, k, None], s, truth)

    def mean(terms: list[Tensor], weight: Tensor = w) -> Tensor:
        return (torch.stack(terms, 1) * weight).sum() / weight.sum().clamp(min=1)

    state_mse, delta_mse, contact_ce = mean(state_terms), mean(delta_terms), mean(contact_terms)
    known = grasp_weight * valid
    grasp_ce = mean(grasp_terms, known)
    loss = state_mse + delta_mse + contact_ce + grasp_ce
    return loss, {"loss": loss, "state_mse": state_mse, "delta_mse": delta_mse, "contact_ce": contact_ce,
                  "contact_acc": mean(correct), "grasp_ce": grasp_ce, "grasp_acc": mean(grasp_right, known),
                  "grasp_labels": (known > 0).sum()}
