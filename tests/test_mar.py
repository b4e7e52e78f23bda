"""The continuous ("mar") HMA variant: continuous latents with a per-token diffusion head."""

from __future__ import annotations

import pytest
import torch

from hma_gym.models.hma import HMA, DiffusionHead, HMAConfig, make_hma
from tests.test_hma_model import EMBODIMENTS, GRID, MAX_FRAMES, make_batch, seeded_loss

C = 3  # latent channels


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_mar(seed: int = 0, **overrides) -> HMA:
    torch.manual_seed(seed)
    kwargs = dict(grid=GRID, vocab_size=16, n_action_tokens=2, max_frames=MAX_FRAMES, embodiments=EMBODIMENTS,
                  head="mar", latent_dim=C, patch_size=2, diff_width=32, diff_depth=2, diff_sample_steps=5,
                  diff_train_steps=100)
    return make_hma("tiny", **{**kwargs, **overrides})


def latent_batch(ids: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    batch = make_batch(ids, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    # smooth latents: a per-sample pattern that drifts over time, as frames of a video do
    base = torch.randn(len(ids), 1, GRID, GRID, C, generator=gen)
    drift = torch.linspace(0, 1, MAX_FRAMES)[None, :, None, None, None]
    batch["tokens"] = 2 * torch.tanh(base + 0.3 * drift)
    return batch


def test_config_and_shapes() -> None:
    with pytest.raises(ValueError, match="head"):
        HMAConfig(head="gan")
    with pytest.raises(ValueError, match="diff_width"):
        HMAConfig(head="mar", diff_width=0)
    cfg = tiny_mar().config
    assert cfg.continuous and HMAConfig.from_dict(cfg.to_dict()) == cfg
    model = tiny_mar()
    assert isinstance(model.image, DiffusionHead) and model.image.units == model.n_slots
    with pytest.raises(ValueError, match="latents must be"):
        model(make_batch([0, 1]))  # integer codes instead of latents (B, T, g, g, C)


def test_latent_slot_round_trip() -> None:
    model = tiny_mar()
    x = torch.randn(2, GRID * GRID, C)
    patches = model.image.grid
    slots = patches.cells_to_slots(x)
    assert slots.shape == (2, model.n_slots, 4 * C)
    assert torch.equal(patches.slots_to_cells(slots), x)
    # a slot holds the 2x2 cells of one patch: cell (0, 1) and (1, 0) of the grid are in slot 0
    grid = x.view(2, GRID, GRID, C)
    assert torch.equal(slots[:, 0].view(2, 4, C)[:, 1], grid[:, 0, 1])
    assert torch.equal(slots[:, 0].view(2, 4, C)[:, 2], grid[:, 1, 0])
    mask = patches.slot_to_token_mask(torch.tensor([[True, False, False, False]]))
    assert mask.view(GRID, GRID)[:2, :2].all() and mask.sum() == 4


def test_training_lowers_the_diffusion_loss() -> None:
    model = tiny_mar()
    batch = latent_batch([0, 1, 0, 1])
    start = seeded_loss(model, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss, metrics = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert {"diff_mse", "state_mse", "action_mse"} <= set(metrics) and "ce" not in metrics
    assert seeded_loss(model, batch) < 0.7 * start


def test_sampling_is_finite_and_deterministic_under_a_seed() -> None:
    model = tiny_mar().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = latent_batch([0, 1])

    def run(seed: int, **kw):
        cache = model.new_cache(2)
        model.append_frame(cache, batch["tokens"][:, 0], batch["states"][:, 0], None, batch["embodiment_ids"])
        gen = torch.Generator().manual_seed(seed)
        return model.generate_frame(cache, batch["actions"][:, 0], batch["embodiment_ids"], generator=gen, **kw)

    lat, state = run(0)
    assert lat.shape == (2, GRID, GRID, C) and lat.dtype == torch.float32 and state.shape == (2, 7 - 2)
    assert torch.isfinite(lat).all() and torch.isfinite(state).all()
    lat2, state2 = run(0)
    assert torch.equal(lat, lat2) and torch.equal(state, state2)
    assert not torch.equal(run(1)[0], lat)
    greedy_a, greedy_b = run(0, greedy=True)[0], run(5, greedy=True)[0]
    assert torch.equal(greedy_a, greedy_b)  # no randomness at all
    assert run(0, steps=3, diffusion_steps=2)[0].shape == lat.shape
    with pytest.raises(ValueError, match="no"):
        cache = model.new_cache(2)
        model.predict_frame(cache, batch["tokens"][:, 0], torch.ones(2, GRID, GRID, dtype=torch.bool),
                            batch["actions"][:, 0], batch["embodiment_ids"])


def test_cache_matches_uncached_clean_stream() -> None:
    model = tiny_mar().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = latent_batch([0, 1])
    full = model.forward_clean(batch["tokens"], batch["actions"], batch["states"], batch["embodiment_ids"])
    cache = model.new_cache(2)
    hidden = []
    for t in range(MAX_FRAMES):
        action = batch["actions"][:, t - 1] if t > 0 else None
        hidden.append(model.append_frame(cache, batch["tokens"][:, t], batch["states"][:, t], action,
                                         batch["embodiment_ids"]))
    torch.testing.assert_close(torch.stack(hidden, 1), full, atol=1e-5, rtol=1e-4)


def test_checkpoint_round_trip(tmp_path) -> None:
    from hma_gym.checkpoint import load_module_weights, save_module

    model = tiny_mar()
    save_module(tmp_path, "dynamics", model, {"hma": model.config.to_dict()})
    clone = HMA(HMAConfig.from_dict(model.config.to_dict()))
    load_module_weights(clone, tmp_path / "dynamics.safetensors")
    for (ka, a), (kb, b) in zip(model.state_dict().items(), clone.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(a, b)


@pytest.mark.slow
def test_mar_pipeline_train_pack_env_and_eval(tiny_data, tokenizer_run, detector_run, tmp_path) -> None:
    """hma-gym train --head mar on real (tiny) Lift data, pack, then the learned env and eval-model run on it."""
    import json

    import gymnasium as gym
    import numpy as np

    from hma_gym.cli import main
    from tests.conftest import DYN_ARGS, read_log

    run = tmp_path / "mar"
    main(["train", "--data", str(tiny_data), "--tokenizer", str(tokenizer_run), "--out", str(run), "--steps", "30",
          "--eval-every", "30", "--save-every", "30", "--head", "mar", "--diff-width", "32", "--diff-depth", "1",
          "--diff-sample-steps", "3", *DYN_ARGS])
    train = [r for r in read_log(run) if r["event"] == "train"]
    assert np.mean([r["diff_mse"] for r in train[-3:]]) < np.mean([r["diff_mse"] for r in train[:3]])
    assert json.loads((run / "dynamics.json").read_text())["config"]["hma"]["head"] == "mar"

    ckpt = tmp_path / "ckpt"
    main(["pack", "--out", str(ckpt), "--tokenizer", str(tokenizer_run), "--dynamics", str(run),
          "--detector", str(detector_run), "--data", str(tiny_data), "--bank-size", "3"])
    assert json.loads((ckpt / "config.json").read_text())["variant"] == "mar"
    env = gym.make("HMA-RobomimicLift-v0", checkpoint=ckpt)
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert obs["agentview_image"].shape == (16, 16, 3) and obs["agentview_image"].dtype == np.uint8
    assert all(np.isfinite(v).all() for v in obs.values()) and 0 <= info["success_prob"] <= 1
    env.close()

    # the DDIM step count is a generation knob: the same seed with 1 step and with 3 steps differ
    def first_frame(**kw):
        e = gym.make("HMA-RobomimicLift-v0", checkpoint=ckpt, **kw)
        e.reset(seed=1)
        frame = e.step(np.zeros(7, np.float32))[0]["agentview_image"]
        e.close()
        return frame
    assert np.array_equal(first_frame(diffusion_steps=3), first_frame())  # trained with --diff-sample-steps 3
    assert not np.array_equal(first_frame(diffusion_steps=1), first_frame())
    with pytest.raises(ValueError, match="diffusion_steps"):
        gym.make("HMA-RobomimicLift-v0", diffusion_steps=0, checkpoint=ckpt)

    out = tmp_path / "eval.json"
    main(["eval-model", "--checkpoint", str(ckpt), "--data", str(tiny_data), "--out", str(out),
          "--random-actions", "1", "--no-progress", "--diffusion-steps", "2"])
    report = json.loads(out.read_text())
    assert np.isfinite(report["psnr"]) and np.isfinite(report["delta_psnr"]) and report["perplexity"] is None
    assert report["config"]["diffusion_steps"] == 2

    # pack --success-rule-from copies another checkpoint's calibrated rule and says where it came from
    config = json.loads((ckpt / "config.json").read_text())
    config["generation"].update(success_threshold=0.7, success_frames=2)
    (ckpt / "config.json").write_text(json.dumps(config))
    ruled = tmp_path / "ruled"
    main(["pack", "--out", str(ruled), "--tokenizer", str(tokenizer_run), "--dynamics", str(run),
          "--detector", str(detector_run), "--data", str(tiny_data), "--bank-size", "3",
          "--success-rule-from", str(ckpt)])
    packed = json.loads((ruled / "config.json").read_text())
    assert (packed["generation"]["success_threshold"], packed["generation"]["success_frames"]) == (0.7, 2)
    assert packed["provenance"]["success_rule_from"] == str(ckpt)


def test_variant_mar_loads_the_shipped_checkpoint_or_says_none_ships() -> None:
    import gymnasium as gym

    from hma_gym.checkpoint import CheckpointError
    from hma_gym.envs.learned_env import ASSETS, VARIANTS

    with pytest.raises(ValueError, match="needs a mar checkpoint"):
        gym.make("HMA-RobomimicLift-v0", diffusion_steps=5)  # the shipped MaskGIT checkpoint
    if (ASSETS / VARIANTS["mar"]).is_dir():
        env = gym.make("HMA-RobomimicLift-v0", variant="mar")
        assert env.unwrapped.sim.wm.continuous
        env.close()
    else:
        with pytest.raises(CheckpointError, match="no mar checkpoint ships"):
            gym.make("HMA-RobomimicLift-v0", variant="mar")


@pytest.mark.slow
def test_warm_start_from_a_maskgit_run(tiny_data, tokenizer_run, dynamics_run, tmp_path) -> None:
    """--head mar --lattice-input --init MASKGIT_RUN --init-mode trunk: the shared weights are the MaskGIT
    model's, [MASK] embeds alike, a rounded latent embeds exactly as MaskGIT embeds its code, and --trainable
    diffusion-head trains the diffusion head alone. A mar model is no trunk source; bad combinations are
    refused."""
    import numpy as np

    from hma_gym.checkpoint import CheckpointError
    from hma_gym.cli import main
    from hma_gym.world_model import load_dynamics, load_tokenizer
    from tests.conftest import DYN_ARGS, read_log
    from training.data import DataConfig, load_episodes
    from training.train_dynamics import DynamicsTrainConfig
    from training.warmstart import IMAGE_IO, mar_from_maskgit

    maskgit, _ = load_dynamics(dynamics_run)
    tok = load_tokenizer(tokenizer_run)
    levels = tok.cfg.levels
    with pytest.raises(ValueError, match="latent_levels"):
        mar_from_maskgit(maskgit, len(levels), diff_width=32, diff_depth=1)
    mar = mar_from_maskgit(maskgit, len(levels), latent_levels=levels, diff_width=32, diff_depth=1)
    shared = {k: v for k, v in maskgit.state_dict().items() if not k.startswith(IMAGE_IO)}
    assert shared and all(torch.equal(v, mar.state_dict()[k]) for k, v in shared.items())
    # a fully masked frame enters both trunks as the same rows
    B, G, D = 2, maskgit.n_image, maskgit.config.d_model
    act, cond = torch.randn(B, 1, maskgit.config.n_action_tokens, D), torch.randn(B, 1, D)
    mode, state = torch.ones(B, 1, dtype=torch.long), torch.randn(B, 1, D)
    all_masked, no_state = torch.ones(B, 1, G, dtype=torch.bool), torch.ones(B, 1, dtype=torch.bool)
    x_mg, _ = maskgit._frame_inputs(torch.zeros(B, 1, G, dtype=torch.long), all_masked, act, cond, mode, state,
                                    no_state)
    x_mar, _ = mar._frame_inputs(torch.randn(B, 1, G, len(levels)), all_masked, act, cond, mode, state, no_state)
    torch.testing.assert_close(x_mar, x_mg)

    # a frame's latents, rounded, embed as MaskGIT embeds the frame's codes (the rounded latents)
    frames = np.concatenate([e.frames for e in load_episodes(DataConfig(data=str(tiny_data), image_size=16),
                                                              "train")])
    with torch.no_grad():
        latent = tok.encode_latent(torch.from_numpy(frames))  # (B, C, g, g)
        codes = tok.quantize(latent)[1].flatten(1)  # (B, G)
        x = latent.permute(0, 2, 3, 1).flatten(1, 2)  # (B, G, C)
        y = maskgit.embed_image(codes)  # (B, S, D)
        assert torch.equal(mar.embed_image(x), y)  # the MaskGIT trunk's inputs, exactly
        assert not torch.equal(mar.embed_image(x + 0.7), y)  # another code

    run = tmp_path / "warm"
    main(["train", "--data", str(tiny_data), "--tokenizer", str(tokenizer_run), "--out", str(run), "--steps", "12",
          "--eval-every", "12", "--save-every", "12", "--head", "mar", "--diff-width", "32", "--diff-depth", "1",
          "--diff-sample-steps", "3", "--lattice-input", "--init", str(dynamics_run), "--init-mode", "trunk",
          "--trainable", "diffusion-head", *DYN_ARGS])
    trained, meta = load_dynamics(run)
    assert meta["init"]["dir"] == str(dynamics_run) and meta["init"]["mode"] == "trunk"
    assert trained.config.latent_levels == tuple(levels)
    after = trained.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in shared.items()), "a frozen shared weight changed"
    assert torch.equal(after["image.latent_in.table.weight"], mar.state_dict()["image.latent_in.table.weight"])
    assert not torch.equal(after["image.net.out.weight"], torch.zeros_like(after["image.net.out.weight"]))
    train = [r for r in read_log(run) if r["event"] == "train"]
    assert np.mean([r["diff_mse"] for r in train[-2:]]) < np.mean([r["diff_mse"] for r in train[:2]])
    with pytest.raises(ValueError, match="--head mar"):
        DynamicsTrainConfig(data=str(tiny_data), init=str(dynamics_run), trainable="diffusion-head")
    with pytest.raises(ValueError, match="--lattice-input"):
        DynamicsTrainConfig(data=str(tiny_data), head="mar", init=str(dynamics_run), init_mode="trunk")
    with pytest.raises(CheckpointError, match="is a mar model; --init-mode trunk starts from a maskgit model"):
        main(["train", "--data", str(tiny_data), "--tokenizer", str(tokenizer_run), "--out", str(tmp_path / "x"),
              "--head", "mar", "--lattice-input", "--init", str(run), "--init-mode", "trunk", "--steps", "2",
              *DYN_ARGS])


def test_model_speed_times_the_shipped_checkpoints(tmp_path, monkeypatch) -> None:
    """benchmarks/model_speed --shipped: both shipped models, each at its own default decoding, in blocks."""
    import json

    import benchmarks.common as common
    from benchmarks.model_speed import main
    from hma_gym.envs.learned_env import default_checkpoint
    from tests.test_learned_env import not_finite_or_positive

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    main(["--shipped", "--batch", "1", "2", "--frames", "1", "--min-seconds", "0", "--blocks", "2"])
    out = json.loads((tmp_path / "model_speed_shipped.json").read_text())
    assert set(out) == {"date", "command", "machine", "rows", "threads", "time_per_frame_vs_maskgit",
                        "mar_time_per_frame_vs_maskgit"}
    rows = out["rows"]
    assert [(r["variant"], r["batch"]) for r in rows] == [(v, b) for b in (1, 2) for v in ("maskgit", "mar")]
    for r in rows:
        assert set(r) == {"variant", "preset", "checkpoint", "greedy", "params_m", "frames_per_s", "ms_per_frame",
                          "block_frames_per_s", "device", "batch", "unmasking_steps"}
        assert r["checkpoint"] == str(default_checkpoint(r["variant"])) and r["unmasking_steps"] == 2
        assert len(r["block_frames_per_s"]) == 2  # --blocks
        assert r["frames_per_s"] == pytest.approx(sum(r["block_frames_per_s"]) / 2)
        assert r["ms_per_frame"] == pytest.approx(1000 / r["frames_per_s"])
    fps = {(r["variant"], r["batch"]): r["frames_per_s"] for r in rows}
    ratios = {f"batch_{b}": pytest.approx(fps["maskgit", b] / fps["mar", b]) for b in (1, 2)}
    assert out["time_per_frame_vs_maskgit"] == {"mar": ratios} and out["mar_time_per_frame_vs_maskgit"] == ratios
    greedy = {r["variant"]: r["greedy"] for r in rows}
    assert greedy == {"maskgit": False, "mar": True}  # the checkpoints' generation settings
    assert not_finite_or_positive({k: v for k, v in out.items() if k != "machine"}) == []
    with pytest.raises(SystemExit):  # a shipped variant that is not a head: only with --shipped
        main(["--variants", "fast", "--presets", "tiny"])


def test_model_speed_presets_time_the_frames_asked_for(tmp_path, monkeypatch) -> None:
    """benchmarks/model_speed over a preset: one row per head with the batch, steps and frame count asked for
    (--min-seconds 0: exactly --frames timed frames of --batch rows) and the MAR/MaskGIT ratio of those rows."""
    import json

    import benchmarks.common as common
    from benchmarks.model_speed import main
    from tests.test_learned_env import not_finite_or_positive

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    main(["--presets", "tiny", "--batch", "2", "--frames", "2", "--min-seconds", "0", "--steps", "3",
          "--diffusion-steps", "4"])
    out = json.loads((tmp_path / "model_speed.json").read_text())
    assert set(out) == {"date", "command", "machine", "rows", "mar_time_per_frame_vs_maskgit", "threads"}
    maskgit, mar = out["rows"]
    assert (maskgit["variant"], mar["variant"]) == ("maskgit", "mar")
    for r in out["rows"]:
        assert (r["preset"], r["batch"], r["unmasking_steps"], r["timed_frames"]) == ("tiny", 2, 3, 4)
        assert r["ms_per_frame"] == pytest.approx(1000 / r["frames_per_s"])
    assert mar["diffusion_steps"] == 4 and 0 < mar["diffusion_head_params_m"] < mar["params_m"]
    ratio = maskgit["frames_per_s"] / mar["frames_per_s"]  # time per frame: MAR's over MaskGIT's
    assert out["mar_time_per_frame_vs_maskgit"] == {"tiny": pytest.approx(ratio)}
    assert not_finite_or_positive({k: v for k, v in out.items() if k != "machine"}) == []
