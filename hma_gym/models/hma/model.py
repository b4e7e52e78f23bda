"""HMA: a spatial-temporal masked-autoregressive world model over image tokens.

Heterogeneous Masked Autoregression (paper sections 3-4). Every frame t is one row of

    N = S image slots (o_t, grid**2 tokens grouped p x p) + n_action_tokens (from a_{t-1}) + 1 state token (s_t)

tokens. The trunk alternates bidirectional attention inside a frame (spatial) with causal
attention across frames for each of the N slots (temporal, RoPE over the frame index); the
action that led into frame t also modulates every sub-layer of frame t (DiT adaLN-Zero).
Action/state stems and heads are per embodiment (``embodiment.py``), so one trunk serves robots
with different action and state sizes; a batch may mix them. The image head (``heads.py``) says
how the image enters the trunk and is predicted: discrete codes (MaskGIT) or continuous latents
with a diffusion head (MAR).

Training ("two streams"): a clean stream (everything visible) runs causally through the
trunk, and a masked stream in which the predicted frames are partly [MASK]ed. In every
temporal layer the masked copy of frame t attends to the clean keys/values of frames < t
and to its own key/value: exactly what key/value-cached generation sees, where the past
frames are known and the current frame is being unmasked. One masking objective covers
forward dynamics, full dynamics, passive video and policy (``OBJECTIVES``).

Inference keeps a per-layer temporal key/value ring buffer of the last ``max_frames - 1``
frames (``HMACache``), so a generated frame costs the same at frame 10 and at frame 10,000:

    cache = model.new_cache(n_envs)
    model.append_frame(cache, tokens0, state0, None, embodiment_ids)
    for t in ...:
        tokens, state = model.generate_frame(cache, action, embodiment_ids, generator=g)
        model.append_frame(cache, tokens, state, action, embodiment_ids)
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hma_gym.models.hma.cache import HMACache
from hma_gym.models.hma.config import HMA_PRESETS, OBJECTIVES, EmbodimentSpec, HMAConfig
from hma_gym.models.hma.embodiment import Embodiments, Groups
from hma_gym.models.hma.heads import CodeHead, make_image_head
from hma_gym.models.hma.layers import Block, init_weights, rope_table

# how the action slot of a frame is filled
ACTION_NONE, ACTION_VISIBLE, ACTION_MASKED = 0, 1, 2

# state-dict key prefixes of the image head's weights from before it was a module of its own (every
# shipped checkpoint's), and their names now; renamed at load by ``_upgrade_state_dict``
LEGACY_KEYS = (("tok_emb.", "image.tok_emb."), ("image_head.", "image.proj."), ("latent_in.", "image.latent_in."),
               ("image_mask_emb", "image.mask_emb"), ("diff_head.", "image.net."))


class HMA(nn.Module):
    """Heterogeneous Masked Autoregression world model (image tokens + state + actions).

    Training: ``loss, metrics = model(batch)``. Inference: ``new_cache``, ``append_frame`` (a known
    frame), ``generate_frame`` (sample the next one), ``predict_frame`` (one masked pass, code heads).
    ``forward_clean`` is the uncached clean stream, e.g. to check the cache against.
    New robots: ``add_embodiment``; ``embodiment_ids`` index the sorted ``embodiment_names``.
    """

    def __init__(self, config: HMAConfig):
        super().__init__()
        self.config = replace(config, embodiments=dict(config.embodiments))  # add_embodiment edits our copy
        D = config.d_model
        self.n_image, self.n_slots, self.group = config.grid**2, config.image_slots, config.patch_size**2
        # an append to some rows runs the trunk on those rows only; False: on every row (one batch shape,
        # which a trunk compiled with dynamic=False needs; see compile_trunk)
        self.append_rows_only = True
        self.pos_emb = nn.Parameter(torch.zeros(config.tokens_per_frame, D))  # learned, one per slot
        self.action_mask_emb = nn.Parameter(torch.zeros(D))
        self.state_mask_emb = nn.Parameter(torch.zeros(D))
        self.no_action_tokens = nn.Parameter(torch.zeros(config.n_action_tokens, D))
        self.no_action_cond = nn.Parameter(torch.zeros(D))
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.image_norm = nn.LayerNorm(D)  # the image slots' outputs, before the image head
        self.apply(init_weights)
        for p in (self.pos_emb, self.action_mask_emb, self.state_mask_emb, self.no_action_tokens,
                  self.no_action_cond):
            nn.init.normal_(p, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
        self.image = make_image_head(config)  # the heads initialise themselves
        self.embodiments = Embodiments(self.config.embodiments, D, config.n_action_tokens)
        self.register_load_state_dict_pre_hook(_upgrade_state_dict)

    # ------------------------------------------------------------------ public helpers

    @property
    def embodiment_names(self) -> list[str]:
        """Sorted embodiment names; ``embodiment_ids`` index this list."""
        return self.embodiments.names

    def embodiment_id(self, name: str) -> int:
        """Index of ``name`` in ``embodiment_names``, as used in ``embodiment_ids``."""
        return self.embodiment_names.index(name)

    def add_embodiment(self, name: str, spec: EmbodimentSpec) -> None:
        """Add a robot: new stems and heads only, the trunk is untouched. Ids of later-sorting names shift."""
        self.embodiments.add(name, spec, like=self.pos_emb)
        self.config.embodiments[name] = spec

    @property
    def max_state_dim(self) -> int:
        return self.embodiments.max_dim("state_dim")

    @property
    def max_action_dim(self) -> int:
        return self.embodiments.max_dim("action_dim")

    def num_params(self) -> int:
        """Number of parameters, embodiment stems and heads included."""
        return sum(p.numel() for p in self.parameters())

    def embed_image(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """The trunk's image inputs: tokens (..., G) codes or (..., G, C) latents, row-major; mask (..., G) bool
        ([MASK], default none) -> (..., S, D), before the slot positions are added."""
        if mask is None:
            mask = torch.zeros(tokens.shape[: tokens.dim() - len(self.image.token_shape)], dtype=torch.bool,
                               device=tokens.device)
        return self.image.embed(tokens, mask)

    def compile_trunk(self) -> None:
        """``torch.compile`` the trunk in place (``dynamic=False``: one graph per batch size and kind of pass),
        for inference. Appends to some rows then run every row (``append_rows_only`` off), so that a reset of
        k rows does not compile a graph for batch k. Weights and state-dict keys are unchanged."""
        self._trunk = torch.compile(self._trunk, dynamic=False)
        self.append_rows_only = False

    # ------------------------------------------------------------------ trunk

    def _frame_inputs(
        self, tokens: Tensor, image_mask: Tensor, action_tokens: Tensor, action_cond: Tensor, action_mode: Tensor,
        state_emb: Tensor, state_mask: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Assemble the token rows of F frames and their conditioning.

        tokens (B, F, G) long (mar: latents (B, F, G, C)), image_mask (B, F, G) bool, action_tokens
        (B, F, n, D), action_cond (B, F, D), action_mode (B, F) in {ACTION_NONE, ACTION_VISIBLE,
        ACTION_MASKED}, state_emb (B, F, D), state_mask (B, F) bool. Returns x (B, F, N, D) and c (B, F, D).
        """
        img = self.image.embed(tokens, image_mask)  # (B, F, S, D)
        visible = (action_mode == ACTION_VISIBLE)[..., None]  # (B, F, 1)
        hidden = torch.where(
            (action_mode == ACTION_MASKED)[..., None, None], self.action_mask_emb, self.no_action_tokens
        )
        act = torch.where(visible[..., None], action_tokens, hidden.to(action_tokens.dtype))  # (B, F, n, D)
        # a masked action must not leak through the modulation either: condition on "no action"
        cond = torch.where(visible, action_cond, self.no_action_cond.to(action_cond.dtype))  # (B, F, D)
        state = torch.where(state_mask[..., None], self.state_mask_emb.to(state_emb.dtype), state_emb)
        x = torch.cat([img, act.to(img.dtype), state[:, :, None].to(img.dtype)], dim=2)  # (B, F, N, D)
        return x + self.pos_emb.to(x.dtype), cond

    def _trunk(
        self, x: Tensor, c: Tensor, pos: Tensor, n_clean: int, cache: HMACache | None = None, kv_only: bool = False,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """x (B, F, N, D), c (B, F, D), pos (B, F) -> hidden (B, F, N, D) and each layer's temporal (k, v).
        ``kv_only``: the last layer stops at its keys/values, and the hidden returned is not the output.
        With a cache, F is 1: one frame per row against the cached frames."""
        if cache is not None and x.shape[1] != 1:
            raise ValueError(f"a cached pass takes 1 frame. Got {x.shape[1]}")
        valid = None if cache is None else cache.valid()
        kvs = []
        last = len(self.blocks) - 1
        table = rope_table(pos, self.config.d_model // self.config.n_head)
        for layer, block in enumerate(self.blocks):
            past = None if cache is None else (cache.k[layer], cache.v[layer], valid)
            x, kv = block(x, c, pos, n_clean, past, kv_only=kv_only and layer == last, table=table)
            kvs.append(kv)
        return x, kvs

    def _flat_tokens(self, tokens: Tensor, lead: int) -> Tensor:
        """(lead dims, g, g) codes -> (lead, G); mar: (lead, g, g, C) latents -> (lead, G, C)."""
        g, shape = self.config.grid, self.image.token_shape
        want = (g, g, *shape)
        if tuple(tokens.shape[lead:]) != want:
            kind = "latents" if shape else "tokens"
            raise ValueError(f"{kind} must be (..., {', '.join(map(str, want))}). Got {tuple(tokens.shape)}")
        return tokens.reshape(*tokens.shape[:lead], g * g, *shape)

    @staticmethod
    def _shift_actions(actions: Tensor, action_valid: Tensor | None) -> tuple[Tensor, Tensor]:
        """actions[:, t] = a_t -> (a_{t-1} of each frame (B, T, A), whether frame t has one (B, T))."""
        B, T = actions.shape[:2]
        prev = F.pad(actions[:, :-1], (0, 0, 1, 0))  # (B, T, A); frame 0's a_{-1} is not in the batch
        if action_valid is None:
            action_valid = torch.ones(B, T, dtype=torch.bool, device=actions.device)
        first = torch.arange(T, device=actions.device) == 0
        return prev, action_valid.to(torch.bool) & ~first

    def forward_clean(
        self, tokens: Tensor, actions: Tensor, states: Tensor, embodiment_ids: Tensor,
        action_valid: Tensor | None = None,
    ) -> Tensor:
        """Uncached clean stream (everything visible, causal across frames) -> hidden (B, T, N, D).

        Same inputs as ``forward``; appending these frames one by one to a fresh cache gives the same outputs.
        """
        B, T = tokens.shape[:2]
        tokens = self._flat_tokens(tokens, 2)
        groups = self.embodiments.groups(embodiment_ids)
        prev_actions, action_valid = self._shift_actions(actions, action_valid)
        act_tok, act_cond = self.embodiments.embed_actions(groups, prev_actions)
        state_emb = self.embodiments.embed_states(groups, states)
        mode = torch.where(action_valid, ACTION_VISIBLE, ACTION_NONE)
        no_mask = torch.zeros(tokens.shape[:3], dtype=torch.bool, device=tokens.device)  # (B, T, G)
        x, c = self._frame_inputs(tokens, no_mask, act_tok, act_cond, mode, state_emb, no_mask[..., 0])
        pos = torch.arange(T, device=tokens.device).expand(B, T)
        h, _ = self._trunk(x, c, pos, n_clean=T)
        return h

    # ------------------------------------------------------------------ training

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Masked-autoregression loss on one batch: sample objective -> mask -> trunk -> head losses.

        batch: ``tokens`` (B, T, g, g) long (mar: latents (B, T, g, g, C)); ``actions`` (B, T, A_max) with
        actions[:, t] = a_t, the action taken at frame t (normalised, zero-padded beyond each embodiment's
        action_dim); ``states`` (B, T, S_max) likewise; ``embodiment_ids`` (B,) long into
        ``embodiment_names``; ``n_prompt`` (B,) long in [1, T-1], frames < n_prompt are context only;
        optional ``action_valid`` (B, T) bool, whether frame t has an incoming action a_{t-1} (column 0 is
        always treated as False).

        Per sample one objective is drawn from ``config.objective_probs``; frames >= n_prompt are predicted:
        - forward: a_{t-1} visible; predict the masked image tokens and the state.
        - full:    as forward, but a_{t-1} is masked too and predicted.
        - passive: no actions anywhere (video only); predict image tokens and state.
        - policy:  image, state and a_{t-1} all masked; predict a_{t-1} (and image/state).
        The clean stream always holds what inference has for past frames: their true image and state,
        and their true actions, except under "passive", where the model never sees actions.

        Returns (loss, metrics); metrics are detached 0-dim tensors: loss, the image head's (ce and
        accuracy of the argmax on masked tokens, or diff_mse), state_mse, action_mse.
        """
        cfg = self.config
        tokens = self._flat_tokens(batch["tokens"], 2)  # (B, T, G) codes, mar: (B, T, G, C) latents
        actions, states, ids, n_prompt = batch["actions"], batch["states"], batch["embodiment_ids"], batch["n_prompt"]
        B, T = tokens.shape[:2]
        device = tokens.device
        if T > cfg.max_frames:
            raise ValueError(f"batch has {T} frames but max_frames is {cfg.max_frames}")
        n_min, n_max = int(n_prompt.min()), int(n_prompt.max())
        if n_min < 1 or n_max > T - 1:
            raise ValueError(f"n_prompt must be in [1, T-1] = [1, {T - 1}]. Got values in [{n_min}, {n_max}]")

        # 1. sample an objective per sample; frames >= n_prompt are predicted
        probs = torch.tensor([cfg.objective_probs.get(o, 0.0) for o in OBJECTIVES], device=device)
        objective = torch.multinomial(probs, B, replacement=True)  # (B,) index into OBJECTIVES
        passive = objective == OBJECTIVES.index("passive")
        policy = objective == OBJECTIVES.index("policy")
        hide_actions = (objective == OBJECTIVES.index("full")) | policy
        predicted = torch.arange(T, device=device)[None, :] >= n_prompt[:, None]  # (B, T)

        # 2. mask: the clean stream sees the history, the masked stream what is to be predicted
        prev_actions, has_action = self._shift_actions(actions, batch.get("action_valid"))  # a_{t-1}: (B, T, A)
        has_action = has_action & ~passive[:, None]  # (B, T)
        clean_mode = torch.where(has_action, ACTION_VISIBLE, ACTION_NONE)
        action_target = has_action & predicted & hide_actions[:, None]  # (B, T) frames whose a_{t-1} is predicted
        masked_mode = torch.where(action_target, ACTION_MASKED, clean_mode)
        image_mask = self.image.sample_mask((B, T), cfg.min_mask_ratio, device)  # (B, T, G)
        image_mask = (image_mask | policy[:, None, None]) & predicted[..., None]
        state_mask = predicted

        # 3. trunk, over the frames some sample predicts
        groups = self.embodiments.groups(ids)
        h = self._two_stream_hidden(groups, tokens, prev_actions, states, clean_mode, masked_mode, image_mask,
                                    state_mask, n_min)  # (B, T', N, D), T' = T - n_min

        # 4. head losses on the predicted frames
        sl, S = slice(n_min, T), self.n_slots
        image_loss, image_metrics = self.image.loss(self.image_norm(h[:, :, :S]), tokens[:, sl], image_mask[:, sl])
        width = states.shape[-1]
        pred_states = self.embodiments.predict_states(groups, h[:, :, -1], width)  # (B, T', S_max)
        w = predicted[:, sl, None] & self.embodiments.dim_mask(ids, "state_dim", width)[:, None]
        state_mse = _masked_mse(pred_states, states[:, sl], w)
        width = actions.shape[-1]
        pred_actions = self.embodiments.predict_actions(groups, h[:, :, S : S + cfg.n_action_tokens], width)
        w = action_target[:, sl, None] & self.embodiments.dim_mask(ids, "action_dim", width)[:, None]
        action_mse = _masked_mse(pred_actions, prev_actions[:, sl], w)  # (B, T', A_max) against a_{t-1}

        loss = image_loss + cfg.state_loss_weight * state_mse + cfg.action_loss_weight * action_mse
        metrics = {"loss": loss, **image_metrics, "state_mse": state_mse, "action_mse": action_mse}
        return loss, {k: v.detach() for k, v in metrics.items()}

    def _two_stream_hidden(
        self, groups: Groups, tokens: Tensor, prev_actions: Tensor, states: Tensor, clean_mode: Tensor,
        masked_mode: Tensor, image_mask: Tensor, state_mask: Tensor, t0: int,
    ) -> Tensor:
        """Clean stream over all T frames + masked stream over frames t0: -> masked hidden (B, T-t0, N, D).

        tokens (B, T, G[, C]); clean_mode / masked_mode (B, T) action modes; image_mask (B, T, G) and
        state_mask (B, T) apply to the masked stream only. Masked frames never attend to each other, so the
        masked stream only needs the frames that some sample predicts.
        """
        B, T = tokens.shape[:2]
        act_tok, act_cond = self.embodiments.embed_actions(groups, prev_actions)  # (B, T, n, D), (B, T, D)
        state_emb = self.embodiments.embed_states(groups, states)  # (B, T, D)
        nothing = torch.zeros_like(image_mask)
        xc, cc = self._frame_inputs(tokens, nothing, act_tok, act_cond, clean_mode, state_emb, nothing[..., 0])
        xm, cm = self._frame_inputs(
            tokens[:, t0:], image_mask[:, t0:], act_tok[:, t0:], act_cond[:, t0:],
            masked_mode[:, t0:], state_emb[:, t0:], state_mask[:, t0:],
        )  # fmt: skip
        pos = torch.arange(T, device=tokens.device).expand(B, T)
        # spatial attention and MLP are per frame, so both streams share one pass along the frame axis
        x = torch.cat([xc, xm], dim=1)  # (B, T + T - t0, N, D)
        h, _ = self._trunk(x, torch.cat([cc, cm], dim=1), torch.cat([pos, pos[:, t0:]], dim=1), n_clean=T)
        return h[:, T:]

    # ------------------------------------------------------------------ inference

    def new_cache(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> HMACache:
        """An empty cache for ``batch_size`` rows holding the last ``max_frames - 1`` frames of each.

        device / dtype default to the model's parameters.
        """
        ref = self.pos_emb
        return HMACache.empty(self.config, batch_size, ref.device if device is None else device,
                              ref.dtype if dtype is None else dtype)

    def _cached_inputs(
        self, tokens: Tensor, image_mask: Tensor | None, state: Tensor | None, action: Tensor | None,
        embodiment_ids: Tensor, action_valid: Tensor | None,
    ) -> tuple[Tensor, Tensor, Groups]:
        """The trunk inputs of one frame per row: x (B, 1, N, D), c (B, 1, D), and the embodiment groups.
        ``image_mask`` None: every token known; ``state`` None: masked; ``action`` None: no action."""
        B, device = tokens.shape[0], tokens.device
        groups = self.embodiments.groups(embodiment_ids)
        if image_mask is None:
            image_mask = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=device)
        if action is None:  # zeros marked invalid
            action = torch.zeros(B, self.max_action_dim, device=device)
            action_valid = torch.zeros(B, dtype=torch.bool, device=device)
        elif action_valid is None:
            action_valid = torch.ones(B, dtype=torch.bool, device=device)
        state_mask = torch.full((B, 1), state is None, dtype=torch.bool, device=device)
        if state is None:
            state = torch.zeros(B, self.max_state_dim, device=device)
        act_tok, act_cond = self.embodiments.embed_actions(groups, action[:, None])  # (B, 1, n, D), (B, 1, D)
        state_emb = self.embodiments.embed_states(groups, state[:, None])  # (B, 1, D)
        mode = torch.where(action_valid.to(torch.bool), ACTION_VISIBLE, ACTION_NONE)[:, None]  # (B, 1)
        x, c = self._frame_inputs(tokens[:, None], image_mask[:, None], act_tok, act_cond, mode, state_emb, state_mask)
        return x, c, groups

    def _cached_pass(
        self, cache: HMACache, tokens: Tensor, image_mask: Tensor | None, state: Tensor | None, action: Tensor | None,
        embodiment_ids: Tensor, action_valid: Tensor | None, kv_only: bool = False,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]], Groups]:
        """One frame per row against the cache (read only).

        tokens (B, G) (mar: latents (B, G, C)), image_mask (B, G) or None (all known), state (B, S) or None
        (masked), action a_{t-1} (B, A) or None. Returns hidden (B, N, D) (not the output if ``kv_only``),
        each layer's (k, v) of this frame and the embodiment groups.
        """
        B = tokens.shape[0]
        if B != cache.batch_size:
            raise ValueError(f"batch size {B} does not match the cache's {cache.batch_size}")
        x, c, groups = self._cached_inputs(tokens, image_mask, state, action, embodiment_ids, action_valid)
        h, kvs = self._trunk(x, c, cache.pos[:, None], n_clean=0, cache=cache, kv_only=kv_only)
        return h[:, 0], kvs, groups

    @torch.no_grad()
    def append_frame(
        self, cache: HMACache, tokens: Tensor, state: Tensor, action: Tensor | None, embodiment_ids: Tensor,
        action_valid: Tensor | None = None, rows: Tensor | None = None, return_hidden: bool = True,
    ) -> Tensor | None:
        """Run the clean stream on one known frame per row and store its keys/values (dropping the oldest).

        tokens (B, g, g) long (mar: latents (B, g, g, C)); state (B, S) normalised, S >= each row's
        state_dim; action (B, A) = a_{t-1}, the action that led into this frame, or None at the start of an
        episode; action_valid (B,) bool marks rows whose action is real (e.g. False for rows that just
        reset); rows (B,) bool: append only to these rows (e.g. the envs of a vector env that just reset).
        Returns hidden (B, N, D), or None with ``return_hidden=False``, which skips the work after the last
        layer's keys/values; then ``rows`` that leave some rows out run the trunk on the chosen rows only.
        """
        tokens = self._flat_tokens(tokens, 1)
        if self.append_rows_only and rows is not None and not return_hidden and not bool(rows.all()):
            index = rows.to(cache.pos.device, torch.bool).nonzero(as_tuple=True)[0]
            if len(index) == 0:
                return None
            action, action_valid = (None if t is None else t[index] for t in (action, action_valid))
            _, kvs, _ = self._cached_pass(cache.select(index), tokens[index], None, state[index], action,
                                          embodiment_ids[index], action_valid, kv_only=True)
            cache.push_rows(kvs, index)
            return None
        h, kvs, _ = self._cached_pass(cache, tokens, None, state, action, embodiment_ids, action_valid,
                                      kv_only=not return_hidden)
        cache.push(kvs, rows)
        return h if return_hidden else None

    @torch.no_grad()
    def predict_frame(
        self, cache: HMACache, tokens: Tensor, image_mask: Tensor, action: Tensor | None, embodiment_ids: Tensor,
        action_valid: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One masked-stream pass for the next frame; does not modify the cache.

        tokens (B, g, g) long (ignored where masked), image_mask (B, g, g) bool (True = [MASK]), state masked.
        Returns image logits (B, g*g, vocab_size) and state (B, max_state_dim) (zero beyond each state_dim).
        """
        if not isinstance(self.image, CodeHead):
            raise ValueError("predict_frame gives logits of discrete tokens; a mar model has none (generate_frame)")
        h, _, groups = self._cached_pass(
            cache, self._flat_tokens(tokens, 1), image_mask.flatten(1), None, action, embodiment_ids, action_valid
        )
        logits = self.image.code_logits(self.image_norm(h[:, : self.n_slots]))  # (B, G, V)
        state = self.embodiments.predict_states(groups, h[:, None, -1], self.max_state_dim)[:, 0]  # (B, S)
        return logits, state

    @torch.no_grad()
    def generate_frame(
        self, cache: HMACache, action: Tensor | None, embodiment_ids: Tensor, steps: int = 2,
        temperature: float = 1.0, generator: torch.Generator | None = None, greedy: bool = False,
        action_valid: Tensor | None = None, diffusion_steps: int | None = None, return_uncertainty: bool = False,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Sample the next frame of every row given its cached history and action a_{t-1} (B, A):
        ``steps`` unmasking passes, each revealing what the image head samples.

        Starts from all-[MASK]; each pass predicts every masked unit and reveals as many as the cosine
        schedule says (the last pass reveals the rest). Units are image tokens for a code head (drawn from
        softmax(logits / temperature)) and slots for the diffusion head (DDIM from noise of std
        temperature, ``diffusion_steps`` steps, default ``config.diff_sample_steps``). They are revealed in
        a random per-row order; the order and the draws come from ``generator`` (on the cache's device), so
        equal inputs and generator state give equal outputs. ``greedy=True``: no randomness at all (argmax
        codes revealed most-confident first; noise-free DDIM in slot order). Does not modify the cache.
        Returns tokens (B, g, g) long (mar: latents (B, g, g, C)) and the state (B, max_state_dim) predicted
        at the last pass (zero beyond each row's state_dim). ``return_uncertainty``: also a dict of (B,)
        float32 fractions in [0, 1]: ``image``, the mean entropy of the image tokens' code distributions at the
        first pass (all masked; NaN for a mar model) over log(vocab_size), and ``state``, zeros (the state is
        regressed, with no distribution to measure; a checkpoint's state model reports its own).
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1. Got {steps=}")
        if not greedy and temperature <= 0:
            raise ValueError(f"temperature must be > 0 (or use greedy=True). Got {temperature=}")
        head, B, device = self.image, cache.batch_size, cache.pos.device
        frame = head.blank(B, device)  # (B, G) codes or (B, G, C) latents, nothing known yet
        known = torch.zeros(B, head.units, dtype=torch.bool, device=device)
        order = None  # the rank at which each unit is revealed (B, units): a random permutation per row
        if not greedy:
            order = torch.rand(B, head.units, device=device, generator=generator).argsort(-1).argsort(-1)
        n_known, image_entropy = 0, None
        for n_next in unmask_schedule(head.units, steps):
            h, _, groups = self._cached_pass(cache, frame, head.token_mask(~known), None, action, embodiment_ids,
                                             action_valid)  # (B, N, D)
            z = self.image_norm(h[:, : self.n_slots])
            if return_uncertainty and image_entropy is None:
                image_entropy = head.entropy(z)
            frame, reveal = head.sample(z, frame, known, (n_known, n_next), order, temperature, generator, greedy,
                                        diffusion_steps)
            known, n_known = known | reveal, n_next
        state = self.embodiments.predict_states(groups, h[:, None, -1], self.max_state_dim)[:, 0]  # (B, S)
        g = self.config.grid
        frame = frame.view(B, g, g, *head.token_shape)
        if not return_uncertainty:
            return frame, state
        if image_entropy is None:  # a diffusion head has no distribution over codes
            image_entropy = torch.full((B,), math.nan, device=device)
        return frame, state, {"image": image_entropy.float(),
                              "state": torch.zeros(B, dtype=torch.float32, device=device)}


def unmask_schedule(units: int, steps: int) -> list[int]:
    """How many of a frame's units are known after each of ``steps`` unmasking passes: MaskGIT's cosine
    schedule, at least one more each pass, all of them after the last."""
    known, n_masked = [], units
    for i in range(steps):
        still = math.floor(units * math.cos(0.5 * math.pi * (i + 1) / steps))
        n_masked = 0 if i == steps - 1 else max(0, min(still, n_masked - 1))
        known.append(units - n_masked)
    return known


def _masked_mse(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    w = weight.to(torch.float32)
    return ((pred.float() - target.float()) ** 2 * w).sum() / w.sum().clamp(min=1.0)


def _upgrade_state_dict(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """Load-time hook: rename the image head's weights of a checkpoint written before the head was a module
    of its own (``LEGACY_KEYS``; every shipped checkpoint), so that it loads unchanged."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        for old, new in LEGACY_KEYS:
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                break


def make_hma(preset: str = "small", **overrides: Any) -> HMA:
    """Build an HMA from a size preset; any ``HMAConfig`` field can be overridden."""
    if preset not in HMA_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(HMA_PRESETS)}")
    return HMA(HMAConfig(**{**HMA_PRESETS[preset](), **overrides}))
