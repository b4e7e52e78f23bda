"""Unit tests of the HMA world model (hma_gym/models/hma/) on tiny configs."""

from __future__ import annotations

import json

import pytest
import torch

from hma_gym.checkpoint import CheckpointError
from hma_gym.models.hma import (
    HMA,
    HMA_PRESETS,
    EmbodimentSpec,
    HMAConfig,
    make_hma,
    sample_image_mask,
)

GRID, VOCAB, MAX_FRAMES = 4, 16, 4
LEVELS = (4, 2, 2)  # FSQ levels of VOCAB codes, for the factorised head
HEADS = {"softmax": {}, "factorized": {"code_levels": LEVELS}}
EMBODIMENTS = {
    "arm": EmbodimentSpec(action_dim=3, state_dim=5),
    "hand": EmbodimentSpec(action_dim=7, state_dim=2),
}
A_MAX, S_MAX = 7, 5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny tensors gain nothing from threads; on a busy 2-core machine OpenMP spinning makes them ~20x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(seed: int = 0, perturb: bool = False, **overrides) -> HMA:
    """A tiny model; ``perturb`` adds noise to all weights so the zero-init adaLN blocks do something."""
    torch.manual_seed(seed)
    kwargs = dict(grid=GRID, vocab_size=VOCAB, n_action_tokens=2, max_frames=MAX_FRAMES, embodiments=EMBODIMENTS)
    model = make_hma("tiny", **{**kwargs, **overrides})
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


def make_batch(embodiment_ids: list[int], T: int = MAX_FRAMES, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    B = len(embodiment_ids)
    ids = torch.tensor(embodiment_ids)
    dims = [(EMBODIMENTS[n].action_dim, EMBODIMENTS[n].state_dim) for n in sorted(EMBODIMENTS)]
    actions = torch.randn(B, T, A_MAX, generator=gen)
    states = torch.randn(B, T, S_MAX, generator=gen)
    for b, k in enumerate(embodiment_ids):  # zero padding beyond each robot's dims
        actions[b, :, dims[k][0] :] = 0
        states[b, :, dims[k][1] :] = 0
    return {
        "tokens": torch.randint(0, VOCAB, (B, T, GRID, GRID), generator=gen),
        "actions": actions,
        "states": states,
        "embodiment_ids": ids,
        "n_prompt": torch.randint(1, T, (B,), generator=gen),
    }


def code_logits(model: HMA, h: torch.Tensor) -> torch.Tensor:
    """The code logits of image-slot outputs h (..., S, D), as predict_frame gives them."""
    return model.image.code_logits(model.image_norm(h))


def seeded_loss(model: HMA, batch: dict[str, torch.Tensor], seed: int = 123) -> float:
    torch.manual_seed(seed)  # same objectives and masks every call
    return model(batch)[0].item()


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("patch_size", [1, 2])
def test_overfit_one_batch(patch_size: int, head: str) -> None:
    model = tiny_model(patch_size=patch_size, **HEADS[head])
    batch = make_batch([0, 1, 0, 1])
    start = seeded_loss(model, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(30):
        torch.manual_seed(step)
        loss, metrics = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(metrics) == {"loss", "ce", "state_mse", "action_mse", "accuracy"}
    assert seeded_loss(model, batch) < start


def test_mixed_embodiments_reach_both_stems_and_ignore_padding() -> None:
    # perturbed: at init the adaLN-Zero gates are closed and the action tokens cannot reach the outputs yet
    model = tiny_model(perturb=True, objective_probs={"full": 1.0})
    batch = make_batch([0, 1, 1, 0])
    loss, metrics = model(batch)
    assert torch.isfinite(loss) and metrics["action_mse"] > 0
    loss.backward()
    for name in EMBODIMENTS:
        emb = model.embodiments[name]
        for p in (emb.action_stem.to_tokens.fc.weight, emb.state_stem.weight, emb.action_head.proj.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert emb.state_head.proj.weight.grad.abs().sum() > 0

    # values in the padding beyond a robot's dims must not matter
    model.zero_grad()
    noisy = dict(batch, actions=batch["actions"] + 100.0, states=batch["states"] + 100.0)
    for b, k in enumerate(batch["embodiment_ids"].tolist()):
        spec = EMBODIMENTS[model.embodiment_names[k]]
        noisy["actions"][b, :, : spec.action_dim] = batch["actions"][b, :, : spec.action_dim]
        noisy["states"][b, :, : spec.state_dim] = batch["states"][b, :, : spec.state_dim]
    assert seeded_loss(model, noisy) == pytest.approx(seeded_loss(model, batch), rel=1e-6)


@pytest.mark.parametrize("objective", ["forward", "passive", "policy"])
def test_each_objective_runs(objective: str) -> None:
    model = tiny_model(objective_probs={objective: 1.0})
    loss, metrics = model(make_batch([0, 1]))
    assert torch.isfinite(loss)
    assert (metrics["action_mse"] > 0) == (objective == "policy")


def test_add_embodiment_keeps_other_parameters() -> None:
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, _ = model(make_batch([0, 1]))
    loss.backward()
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    model.add_embodiment("gripper", EmbodimentSpec(action_dim=2, state_dim=4))
    after = model.state_dict()
    assert model.embodiment_names == ["arm", "gripper", "hand"]
    assert model.config.embodiments["gripper"] == EmbodimentSpec(2, 4)
    new = set(after) - set(before)
    assert new and all(k.startswith("embodiments.gripper.") for k in new)
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    with pytest.raises(ValueError, match="already exists"):
        model.add_embodiment("arm", EmbodimentSpec(3, 5))

    batch = make_batch([0, 0])  # shapes fit "gripper" (ids now index the new sorted names)
    batch["embodiment_ids"] = torch.tensor([model.embodiment_id("gripper"), model.embodiment_id("hand")])
    loss, _ = model(batch)
    loss.backward()
    assert model.embodiments["gripper"].state_stem.weight.grad.abs().sum() > 0


def test_bad_batches_raise() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="n_prompt"):
        model(dict(make_batch([0, 1]), n_prompt=torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="max_frames"):
        model(make_batch([0, 1], T=MAX_FRAMES + 1))
    with pytest.raises(ValueError, match="embodiment id"):
        model(dict(make_batch([0, 1]), embodiment_ids=torch.tensor([0, 2])))


def test_blocks_start_as_identity() -> None:
    model = tiny_model()
    batch = make_batch([0, 1])
    h = model.forward_clean(batch["tokens"], batch["actions"], batch["states"], batch["embodiment_ids"])
    x = model.embed_image(batch["tokens"].flatten(2)) + model.pos_emb[: GRID * GRID]  # patch_size 1: one table
    torch.testing.assert_close(h[:, :, : GRID * GRID], x)


# ----------------------------------------------------------------------------- masking


@pytest.mark.parametrize("min_ratio", [0.0, 0.3])
def test_mask_schedule(min_ratio: float) -> None:
    n = 16
    mask, ratio = sample_image_mask((500,), n, min_ratio, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (500, n) and mask.dtype == torch.bool
    assert (ratio >= min_ratio).all() and (ratio <= 1).all()
    counts = mask.sum(-1)
    assert (counts >= 1).all()
    assert (counts == (ratio * n).ceil().clamp(min=1)).all()
    assert (counts == n).any() and (counts < n // 2).any()  # the cosine schedule spans the range


# ----------------------------------------------------------------------------- inference


def append_all(model: HMA, cache, batch: dict[str, torch.Tensor], frames: range, action_valid=None):
    """Append the batch's frames to the cache; frame t's incoming action is actions[:, t-1]."""
    out = []
    for t in frames:
        action = batch["actions"][:, t - 1] if t > 0 else None
        valid = action_valid[:, t] if action_valid is not None and t > 0 else None
        out.append(
            model.append_frame(
                cache, batch["tokens"][:, t], batch["states"][:, t], action, batch["embodiment_ids"], valid
            )
        )
    return torch.stack(out, dim=1)  # (B, T, N, D)


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("patch_size", [1, 2])
def test_cache_matches_uncached_clean_stream(patch_size: int, head: str) -> None:
    model = tiny_model(perturb=True, patch_size=patch_size, **HEADS[head]).eval()
    batch = make_batch([0, 1, 1])
    action_valid = torch.ones(3, MAX_FRAMES, dtype=torch.bool)
    action_valid[1, 2] = False  # one missing action label
    full = model.forward_clean(
        batch["tokens"], batch["actions"], batch["states"], batch["embodiment_ids"], action_valid
    )
    cache = model.new_cache(3)
    cached = append_all(model, cache, batch, range(MAX_FRAMES), action_valid)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)
    image = slice(0, model.n_slots)  # the image slots of each frame
    torch.testing.assert_close(
        code_logits(model, cached[..., image, :]), code_logits(model, full[..., image, :]), atol=1e-5, rtol=1e-4
    )
    assert cache.pos.tolist() == [MAX_FRAMES] * 3


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("patch_size", [1, 2])
def test_cached_prediction_matches_training_masked_stream(patch_size: int, head: str) -> None:
    """What generation sees (clean cached past + masked current frame) is what training optimises."""
    model = tiny_model(perturb=True, patch_size=patch_size, **HEADS[head]).eval()
    batch = make_batch([0, 1])
    B, T, G, t0 = 2, MAX_FRAMES, GRID * GRID, 1
    tokens = batch["tokens"].flatten(2)
    prev_actions, has_action = model._shift_actions(batch["actions"], None)
    mode = has_action.long()  # ACTION_VISIBLE where there is an incoming action, else ACTION_NONE
    image_mask = sample_image_mask((B, T), G, 0.2, generator=torch.Generator().manual_seed(1))[0]
    groups = model.embodiments.groups(batch["embodiment_ids"])
    h = model._two_stream_hidden(
        groups,
        tokens,
        prev_actions,
        batch["states"],
        mode,
        mode,
        image_mask,
        torch.ones(B, T, dtype=torch.bool),
        t0,
    )
    cache = model.new_cache(B)
    append_all(model, cache, batch, range(t0))
    for t in range(t0, T):
        logits, _ = model.predict_frame(
            cache, batch["tokens"][:, t], image_mask[:, t].view(B, GRID, GRID), batch["actions"][:, t - 1],
            batch["embodiment_ids"],
        )  # fmt: skip
        torch.testing.assert_close(logits, code_logits(model, h[:, t - t0, : model.n_slots]), atol=1e-5, rtol=1e-4)
        append_all(model, cache, batch, range(t, t + 1))


def test_sliding_window_keeps_cache_size_constant() -> None:
    model = tiny_model(perturb=True).eval()
    batch = make_batch([0, 1])
    cache = model.new_cache(2)
    shape, nbytes = cache.k[0].shape, cache.nbytes()
    action = batch["actions"][:, 0]
    model.append_frame(cache, batch["tokens"][:, 0], batch["states"][:, 0], None, batch["embodiment_ids"])
    gen = torch.Generator().manual_seed(0)
    for _ in range(5 * MAX_FRAMES):
        tokens, state = model.generate_frame(cache, action, batch["embodiment_ids"], generator=gen)
        model.append_frame(cache, tokens, state, action, batch["embodiment_ids"])
    assert cache.k[0].shape == shape and cache.nbytes() == nbytes
    assert cache.window == MAX_FRAMES - 1
    assert cache.length.tolist() == [MAX_FRAMES - 1] * 2
    assert cache.pos.tolist() == [5 * MAX_FRAMES + 1] * 2  # absolute frame index keeps growing
    assert ((tokens >= 0) & (tokens < VOCAB)).all() and torch.isfinite(state).all()


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("patch_size", [1, 2])
def test_generate_is_deterministic_and_valid(patch_size: int, head: str) -> None:
    model = tiny_model(perturb=True, patch_size=patch_size, **HEADS[head]).eval()
    batch = make_batch([0, 1, 0])
    ids = batch["embodiment_ids"]
    cache = model.new_cache(3)
    append_all(model, cache, batch, range(2))
    pos = cache.pos.clone()

    def sample(seed: int, **kwargs):
        gen = torch.Generator().manual_seed(seed)
        return model.generate_frame(cache, batch["actions"][:, 1], ids, generator=gen, **kwargs)

    tokens_a, state_a = sample(0)
    tokens_b, state_b = sample(0)
    tokens_c, _ = sample(1, temperature=2.0)
    assert torch.equal(tokens_a, tokens_b) and torch.equal(state_a, state_b)
    assert not torch.equal(tokens_a, tokens_c)
    assert tokens_a.shape == (3, GRID, GRID) and tokens_a.dtype == torch.long
    assert ((tokens_a >= 0) & (tokens_a < VOCAB)).all()
    assert state_a.shape == (3, S_MAX)
    assert (state_a[1, EMBODIMENTS["hand"].state_dim :] == 0).all()  # padding beyond the robot's state
    assert torch.equal(cache.pos, pos)  # generation leaves the cache alone

    greedy_a, _ = sample(0, greedy=True)
    greedy_b, _ = sample(7, greedy=True)
    assert torch.equal(greedy_a, greedy_b)


def test_partial_reset_matches_fresh_cache() -> None:
    model = tiny_model(perturb=True).eval()
    batch = make_batch([0, 1, 1], seed=1)
    other = make_batch([0, 1, 1], seed=2)
    cache = model.new_cache(3)
    append_all(model, cache, batch, range(3))
    cache.reset(torch.tensor([False, True, False]))
    # all rows go on together; row 1 starts a new episode with `other`'s frames
    mixed = {k: v.clone() for k, v in batch.items()}
    for k in ("tokens", "actions", "states"):
        mixed[k][1] = other[k][1]
    valid = torch.ones(3, MAX_FRAMES, dtype=torch.bool)
    valid[1, 0] = False
    hidden = []
    for t in range(2):
        hidden.append(
            model.append_frame(
                cache,
                mixed["tokens"][:, t],
                mixed["states"][:, t],
                mixed["actions"][:, t - 1],
                mixed["embodiment_ids"],
                valid[:, t],
            )  # fmt: skip
        )
    greedy, state = model.generate_frame(cache, mixed["actions"][:, 1], mixed["embodiment_ids"], greedy=True)

    row = {k: v[1:2] for k, v in other.items()}
    fresh = model.new_cache(1)
    expected = append_all(model, fresh, row, range(2))
    torch.testing.assert_close(torch.stack(hidden, 1)[1:2], expected, atol=1e-5, rtol=1e-4)
    greedy_fresh, state_fresh = model.generate_frame(fresh, row["actions"][:, 1], row["embodiment_ids"], greedy=True)
    assert torch.equal(greedy[1:2], greedy_fresh)
    torch.testing.assert_close(state[1:2], state_fresh, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- config


def test_config_round_trip() -> None:
    cfg = HMAConfig(
        vocab_size=VOCAB,
        grid=GRID,
        d_model=32,
        n_head=2,
        n_layer=2,
        objective_probs={"forward": 0.5, "policy": 0.5},
        embodiments=EMBODIMENTS,
    )
    again = HMAConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert isinstance(again.embodiments["arm"], EmbodimentSpec)
    with pytest.raises(ValueError, match="bogus"):
        HMAConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_config_reads_the_keys_of_removed_options_where_they_are_off() -> None:
    """Older configs (the shipped checkpoints' among them) hold keys of removed options: read where they
    hold the value that meant "off", refused otherwise."""
    cfg = HMAConfig(vocab_size=VOCAB, grid=GRID).to_dict()
    assert HMAConfig.from_dict({**cfg, "latent_in_hidden": 0}) == HMAConfig.from_dict(cfg)
    with pytest.raises(ValueError, match="latent_in_hidden=32: the MLP latent input was removed"):
        HMAConfig.from_dict({**cfg, "latent_in_hidden": 32})
    mar = HMAConfig(head="mar", latent_dim=2, latent_levels=(3, 4), patch_size=2, grid=GRID).to_dict()
    assert HMAConfig.from_dict({**mar, "round_latent_input": True}) == HMAConfig.from_dict(mar)
    assert HMAConfig.from_dict({**cfg, "round_latent_input": False}) == HMAConfig.from_dict(cfg)
    with pytest.raises(ValueError, match="interpolating lattice input was removed"):
        HMAConfig.from_dict({**mar, "round_latent_input": False})
    # an embodiment's binned state values (removed: superseded by the state model)
    arm = {"action_dim": 3, "state_dim": 5}
    old = {**cfg, "embodiments": {"arm": {**arm, "state_bins": []}}}
    assert HMAConfig.from_dict(old) == HMAConfig.from_dict({**cfg, "embodiments": {"arm": arm}})
    with pytest.raises(CheckpointError, match=r"state_bins=\[\[2, \[0.5\]\]\]: binned state values were removed"):
        HMAConfig.from_dict({**cfg, "embodiments": {"arm": {**arm, "state_bins": [[2, [0.5]]]}}})


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"vocab_size": 1}, "vocab_size"),
        ({"d_model": 30, "n_head": 4}, "d_model"),
        ({"d_model": 6, "n_head": 2}, "head dim"),
        ({"n_layer": 0}, "n_layer"),
        ({"max_frames": 1}, "max_frames"),
        ({"dropout": 1.0}, "dropout"),
        ({"min_mask_ratio": 1.5}, "min_mask_ratio"),
        ({"objective_probs": {"dream": 1.0}}, "objective_probs"),
        ({"objective_probs": {"forward": -1.0}}, "objective_probs"),
        ({"embodiments": {"arm": {"action_dim": 0, "state_dim": 2}}}, "action_dim"),
        ({"embodiments": {"a.b": EmbodimentSpec(1, 1)}}, "embodiment names"),
        ({"vocab_size": 16, "code_levels": (4, 3)}, "code_levels"),
        ({"vocab_size": 16, "code_levels": (16, 1)}, "code_levels"),
        ({"head": "mar", "code_levels": (4, 4), "vocab_size": 16}, "code_levels"),
    ],
)
def test_bad_config_raises(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        HMAConfig(**overrides)


def test_presets() -> None:
    assert set(HMA_PRESETS) == {"tiny", "small", "base", "xl"}
    assert HMA_PRESETS["base"]() == {"d_model": 256, "n_layer": 32, "n_head": 8}
    for preset in HMA_PRESETS:
        HMAConfig(**HMA_PRESETS[preset]())  # every preset is a valid config
    model = make_hma("tiny", embodiments=EMBODIMENTS)
    assert model.num_params() == sum(p.numel() for p in model.parameters()) > 0
    with pytest.raises(ValueError, match="unknown preset"):
        make_hma("huge")


def test_patch_grouping_round_trip() -> None:
    """Grouping image tokens 2x2 into trunk tokens and back restores row-major token order."""
    model = tiny_model(patch_size=2)
    tokens = torch.arange(GRID * GRID).view(1, GRID * GRID)
    slots = model.image.grid.to_slots(tokens)  # (1, 4, 4)
    assert slots.shape == (1, (GRID // 2) ** 2, 4)
    assert slots[0, 0].tolist() == [0, 1, GRID, GRID + 1]  # the top-left 2x2 group
    back = model.image.grid.from_slots(slots[..., None].float())[..., 0].long()
    assert torch.equal(back, tokens)
    assert model.config.tokens_per_frame == (GRID // 2) ** 2 + 2 + 1


def test_row_masked_append_leaves_other_rows_untouched() -> None:
    model = tiny_model(perturb=True).eval()
    batch = make_batch([0, 1, 0])
    cache = model.new_cache(3)
    append_all(model, cache, batch, range(2))
    keys = [k.clone() for k in cache.k]
    pos = cache.pos.clone()
    rows = torch.tensor([False, True, False])
    model.append_frame(cache, batch["tokens"][:, 2], batch["states"][:, 2], batch["actions"][:, 1],
                       batch["embodiment_ids"], rows=rows)
    assert cache.pos.tolist() == [pos[0].item(), pos[1].item() + 1, pos[2].item()]
    for before, after in zip(keys, cache.k, strict=True):
        assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
        assert not torch.equal(before[1], after[1])


def test_sample_categorical_matches_the_distribution():
    """The generator's token sampler: frequencies follow the (unnormalised) probabilities, entries of
    probability 0 are never drawn, and a seeded generator repeats its draws."""
    from hma_gym.models.hma import sample_categorical

    probs = torch.tensor([[0.0, 1.0, 3.0, 0.0, 4.0], [5.0, 0.0, 0.0, 0.0, 0.0]]).repeat(20000, 1)  # (40000, 5)
    draws = sample_categorical(probs, torch.Generator().manual_seed(0))
    assert draws.dtype == torch.long and draws.shape == (40000,)
    first, second = draws[0::2], draws[1::2]
    assert (second == 0).all()
    freq = torch.bincount(first, minlength=5).float() / len(first)
    assert freq[0] == 0 and freq[3] == 0
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.125, 0.375, 0.0, 0.5]), atol=0.012, rtol=0)
    again = sample_categorical(probs, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


@pytest.mark.parametrize("V", [1000, 1009])
def test_two_level_sampling_picks_the_index_of_one_cumulative_sum(V: int) -> None:
    """sample_categorical sums in blocks (V = 1009 is prime: padded blocks); with the same uniforms it
    picks the index a single inverse CDF over V would, but for float rounding at a boundary. order=
    hands the rows over permuted and gets each row the uniform it would have had in place."""
    from hma_gym.models.hma import sample_categorical

    probs = torch.softmax(3 * torch.randn(4000, V, generator=torch.Generator().manual_seed(1)), -1)
    probs[:, ::7] = 0  # entries that must never be drawn
    draws = sample_categorical(probs, torch.Generator().manual_seed(0))
    cdf = probs.double().cumsum(-1)
    u = torch.rand(4000, 1, generator=torch.Generator().manual_seed(0)).double() * cdf[:, -1:]
    flat = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    assert (draws == flat).float().mean() > 0.999
    assert (draws % 7 != 0).all() and (draws < V).all()
    perm = torch.randperm(4000, generator=torch.Generator().manual_seed(2))
    permuted = sample_categorical(probs[perm], torch.Generator().manual_seed(0), order=perm)
    assert torch.equal(permuted, draws[perm])


def test_append_without_hidden_stores_the_same_keys_and_values() -> None:
    """return_hidden=False (what the env uses) stops the last layer at its keys/values: same cache."""
    model = tiny_model(perturb=True).eval()
    batch = make_batch([0, 1, 0])
    full, lean = model.new_cache(3), model.new_cache(3)
    append_all(model, full, batch, range(3))
    for t in range(3):
        action = batch["actions"][:, t - 1] if t > 0 else None
        out = model.append_frame(lean, batch["tokens"][:, t], batch["states"][:, t], action, batch["embodiment_ids"],
                                 return_hidden=False)
        assert out is None
    assert torch.equal(full.pos, lean.pos)
    for a, b in zip(full.k + full.v, lean.k + lean.v, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("patch_size", [1, 2])
def test_token_logits_match_the_full_head(patch_size: int, head: str) -> None:
    """generate_frame computes logits only for the tokens it samples: the same values as the full head
    (factorised head: its per-channel logits give the full head's code log-probabilities)."""
    model = tiny_model(perturb=True, patch_size=patch_size, **HEADS[head]).eval()
    batch = make_batch([0, 1])
    cache = model.new_cache(2)
    append_all(model, cache, batch, range(2))
    mask = torch.rand(2, model.n_image, generator=torch.Generator().manual_seed(0)) < 0.5
    tokens = batch["tokens"][:, 2].flatten(1)
    h, _, _ = model._cached_pass(cache, tokens, mask, None, batch["actions"][:, 1], batch["embodiment_ids"], None)
    g = model.config.grid
    full, _ = model.predict_frame(cache, tokens.view(2, g, g), mask.view(2, g, g), batch["actions"][:, 1],
                                  batch["embodiment_ids"])
    rows, cols = mask.nonzero(as_tuple=True)
    logits, rows_out, cols_out, order = model.image.token_logits(model.image_norm(h[:, : model.n_slots]), rows, cols)
    if patch_size == 1:
        assert order is None
    else:  # rows come back grouped by sub-position; order says which token each is
        assert sorted(order.tolist()) == list(range(len(rows))) and not torch.equal(order, torch.arange(len(rows)))
        rows, cols = rows[order], cols[order]
    assert torch.equal(rows_out, rows) and torch.equal(cols_out, cols)
    if model.config.factorized:
        assert logits.shape == (len(rows), sum(LEVELS))
        logits = model.image.log_probs(logits)
    torch.testing.assert_close(logits, full[rows, cols], atol=1e-5, rtol=1e-5)


def test_appending_some_rows_runs_only_those_rows() -> None:
    """append_frame(rows=mask, return_hidden=False) runs the trunk on the chosen rows alone; the cache it
    leaves equals a full-batch pass that stores only those rows (return_hidden=True), and the other
    rows' history is untouched."""
    model = tiny_model(perturb=True).eval()
    batch = make_batch([0, 1, 1], seed=7)
    ids = batch["embodiment_ids"]
    caches = [model.new_cache(3), model.new_cache(3)]
    for cache in caches:
        for t in range(2):
            a = None if t == 0 else batch["actions"][:, t - 1]
            model.append_frame(cache, batch["tokens"][:, t], batch["states"][:, t], a, ids, return_hidden=False)
    subset, full = caches
    before = [k.clone() for k in subset.k]
    mask = torch.tensor([True, False, True])
    calls = []
    hook = model.blocks[0].register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    model.append_frame(subset, batch["tokens"][:, 2], batch["states"][:, 2], batch["actions"][:, 1], ids,
                       rows=mask, return_hidden=False)
    assert calls == [2]  # two rows through the trunk, not three
    model.append_frame(full, batch["tokens"][:, 2], batch["states"][:, 2], batch["actions"][:, 1], ids,
                       rows=mask, return_hidden=True)
    hook.remove()
    assert calls == [2, 3]
    assert subset.pos.tolist() == full.pos.tolist() == [3, 2, 3]
    for layer in range(len(subset.k)):
        torch.testing.assert_close(subset.k[layer], full.k[layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(subset.v[layer], full.v[layer], atol=1e-5, rtol=1e-5)
        assert torch.equal(subset.k[layer][1], before[layer][1])
    # no row chosen: nothing runs, nothing changes
    model.append_frame(subset, batch["tokens"][:, 3], batch["states"][:, 3], None, ids,
                       rows=torch.zeros(3, dtype=torch.bool), return_hidden=False)
    assert subset.pos.tolist() == [3, 2, 3]
    # append_rows_only=False (a compiled trunk: one batch shape): every row runs, only the chosen are stored
    model.append_rows_only = False
    hook = model.blocks[0].register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    model.append_frame(subset, batch["tokens"][:, 3], batch["states"][:, 3], None, ids, rows=mask,
                       return_hidden=False)
    hook.remove()
    assert calls == [2, 3, 3] and subset.pos.tolist() == [4, 2, 4]


# ----------------------------------------------------------------------------- the factorised head


def test_factorized_head_is_small_and_its_code_probabilities_are_the_channel_product() -> None:
    """code_levels: sum(levels) logits a token; a code's log-probability is the sum of its channels'
    log-softmaxes at its digits (first channel least significant, the tokenizer's code order), the codes'
    probabilities sum to 1, and the training loss is the cross-entropy of those code probabilities."""
    from hma_gym.models.tokenizer import index_to_codes

    plain = tiny_model(patch_size=2)
    model = tiny_model(perturb=True, patch_size=2, code_levels=LEVELS)
    assert model.image.proj.out_features == 4 * sum(LEVELS) and plain.image.proj.out_features == 4 * VOCAB
    logits = torch.randn(5, sum(LEVELS), generator=torch.Generator().manual_seed(0))
    logp = model.image.log_probs(logits)  # (5, VOCAB)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(5))
    parts = logits.split(list(LEVELS), -1)
    for code in (0, 1, 7, 13, 15):
        digits = index_to_codes(torch.tensor(code), LEVELS).tolist()
        by_hand = sum(p.log_softmax(-1)[:, d] for p, d in zip(parts, digits, strict=True))
        torch.testing.assert_close(logp[:, code], by_hand)
    target = torch.tensor([3, 15, 0, 8, 6])
    ce, accuracy = model.image.cross_entropy(logits, target)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logp, target))
    assert accuracy == (logp.argmax(-1) == target).float().mean()


def test_factorized_embedding_sums_channel_rows_and_masks_whole_codes() -> None:
    from hma_gym.models.tokenizer import index_to_codes

    model = tiny_model(perturb=True, patch_size=1, code_levels=LEVELS)
    tokens = torch.randint(0, VOCAB, (1, 1, GRID * GRID), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[0, 0, 3] = True
    emb = model.embed_image(tokens, mask)[0, 0]  # (G, D)
    L, table = sum(LEVELS), model.image.tok_emb.weight
    digits = index_to_codes(tokens[0, 0, 0], LEVELS)
    torch.testing.assert_close(emb[0], table[digits[0]] + table[4 + digits[1]] + table[6 + digits[2]])
    torch.testing.assert_close(emb[3], table[L])  # [MASK]: the mask row alone, whatever the code under it


def test_factorized_sampling_follows_the_code_distribution() -> None:
    """Each channel drawn from its softmax gives codes with the product probabilities; greedy picks the
    most likely code; a seeded generator repeats its draws."""
    model = tiny_model(code_levels=LEVELS)
    logits = (2 * torch.randn(1, sum(LEVELS), generator=torch.Generator().manual_seed(3))).repeat(40000, 1)
    codes, logp = model.image.draw(logits, 1.0, torch.Generator().manual_seed(0), None, False)
    expected = model.image.log_probs(logits[:1])[0]
    torch.testing.assert_close(logp, expected[codes])
    freq = torch.bincount(codes, minlength=VOCAB).float() / len(codes)
    torch.testing.assert_close(freq, expected.exp(), atol=0.012, rtol=0)
    again, _ = model.image.draw(logits, 1.0, torch.Generator().manual_seed(0), None, False)
    assert torch.equal(codes, again)
    best, best_logp = model.image.draw(logits[:1], 1.0, None, None, True)
    assert best.item() == expected.argmax().item() and best_logp.item() == pytest.approx(expected.max().item())


def test_factorized_greedy_frame_is_the_argmax_code_of_every_token() -> None:
    """One greedy unmasking step fills every token with the argmax of predict_frame's code distribution."""
    model = tiny_model(perturb=True, patch_size=2, code_levels=LEVELS).eval()
    batch = make_batch([0, 1])
    cache = model.new_cache(2)
    append_all(model, cache, batch, range(2))
    ids, action = batch["embodiment_ids"], batch["actions"][:, 1]
    tokens, _ = model.generate_frame(cache, action, ids, steps=1, greedy=True)
    logp, _ = model.predict_frame(cache, batch["tokens"][:, 2], torch.ones(2, GRID, GRID, dtype=torch.bool), action,
                                  ids)
    assert torch.equal(tokens.flatten(1), logp.argmax(-1))


@pytest.mark.parametrize("masked", [False, True])
def test_reset_clears_the_keys_and_values_of_the_rows_it_resets(masked: bool) -> None:
    """NaN keys/values left by an earlier episode must not leak into the next one through masked attention
    (a masked slot's probability is 0, and 0 * NaN is NaN)."""
    model = tiny_model(perturb=True).eval()
    batch = make_batch([0, 1])
    cache = model.new_cache(2)
    append_all(model, cache, batch, range(2))
    for k, v in zip(cache.k, cache.v, strict=True):  # an earlier episode of row 0 went NaN
        k[0], v[0] = float("nan"), float("nan")
    cache.reset(torch.tensor([True, False]) if masked else None)
    if masked:  # the other row keeps its history
        assert all(torch.isfinite(k[1]).all() and torch.isfinite(v[1]).all() for k, v in zip(cache.k, cache.v,
                                                                                              strict=True))
        assert cache.pos.tolist() == [0, 2]
    hidden = model.append_frame(cache, batch["tokens"][:, 0], batch["states"][:, 0], None, batch["embodiment_ids"])
    tokens, state = model.generate_frame(cache, batch["actions"][:, 0], batch["embodiment_ids"], greedy=True)
    assert torch.isfinite(hidden).all() and torch.isfinite(state).all()


@pytest.mark.parametrize("head", ["softmax", "factorized", "mar"])
def test_weights_named_as_before_the_image_head_module_load(head: str) -> None:
    """Checkpoints written before the image head was a module of its own (every shipped one) name its
    weights as the model's (tok_emb, image_head, latent_in, image_mask_emb, diff_head): they load, strictly,
    into the same tensors."""
    from hma_gym.models.hma.model import LEGACY_KEYS

    mar = dict(head="mar", latent_dim=3, patch_size=2, diff_width=16, diff_depth=1, latent_levels=(3, 3, 2))
    overrides = {"mar": mar, **HEADS}[head]
    model = tiny_model(perturb=True, **overrides)
    legacy = {}
    for key, value in model.state_dict().items():
        old = next((o + key[len(n):] for o, n in LEGACY_KEYS if key.startswith(n)), key)
        legacy[old] = value
    assert not any(k.startswith("image.") for k in legacy)
    assert ("latent_in.table.weight" in legacy) == (head == "mar") and ("tok_emb.weight" in legacy) != (head == "mar")
    fresh = tiny_model(seed=1, **overrides)
    fresh.load_state_dict(legacy)  # strict
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
