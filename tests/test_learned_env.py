"""Contract of the learned env on a checkpoint built by the project's own commands (tiny, 16x16)."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import hma_gym
from hma_gym.checkpoint import CheckpointError
from hma_gym.envs.learned_env import HMAEnv, HMAVectorEnv, check_paired
from hma_gym.envs.robosuite_env import RobosuiteEnv

# every test here uses the tiny pipeline of conftest.py (tiny_checkpoint)
pytestmark = pytest.mark.slow


def not_finite_or_positive(report, where: str = "") -> list[str]:
    """The paths of the numbers in a benchmark report (nested dicts and lists) that are not finite and > 0;
    bools, strings and None are not numbers here."""
    if isinstance(report, dict):
        return [p for k, v in report.items() for p in not_finite_or_positive(v, f"{where}.{k}")]
    if isinstance(report, list | tuple):
        return [p for i, v in enumerate(report) for p in not_finite_or_positive(v, f"{where}[{i}]")]
    if isinstance(report, int | float) and not isinstance(report, bool) and not (np.isfinite(report) and report > 0):
        return [f"{where} = {report}"]
    return []


@pytest.fixture(scope="module")
def env(tiny_checkpoint):
    e = HMAEnv(checkpoint=tiny_checkpoint)
    yield e
    e.close()


def test_spaces_match_the_gt_env_it_mirrors(env):
    gt = RobosuiteEnv(image_size=16)
    check_paired(gt, env)  # same keys, shapes, dtypes and bounds
    assert env.observation_space["agentview_image"].shape == (16, 16, 3)
    assert env.action_space == gym.spaces.Box(-1, 1, (7,), np.float32)
    gt64 = RobosuiteEnv(image_size=64)
    with pytest.raises(ValueError, match=r"agentview_image: shape \(64, 64, 3\)"):
        check_paired(gt64, env)
    gt.close()
    gt64.close()


def test_checkers(tiny_checkpoint):
    e = HMAEnv(checkpoint=tiny_checkpoint, render_mode="rgb_array")
    check_env(e, skip_render_check=False)
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    sb3_check_env(e, warn=True)


def test_seeded_rollouts_are_reproducible(env):
    actions = np.random.default_rng(0).uniform(-1, 1, (6, 7)).astype(np.float32)

    def run(seed):
        obs, _ = env.reset(seed=seed)
        frames = [obs["agentview_image"]]
        for a in actions:
            frames.append(env.step(a)[0]["agentview_image"])
        return np.stack(frames)

    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_paired_reset_starts_from_the_given_observation(env):
    gt = RobosuiteEnv(image_size=16)
    gt_obs, _ = gt.reset(seed=5)
    obs, info = env.reset(seed=5, options={"initial_observation": gt_obs})
    for key in gt_obs:
        np.testing.assert_array_equal(obs[key], gt_obs[key])
    assert info["is_success"] is False
    gt.close()


def test_bad_inputs_raise_and_leave_env_usable(tiny_checkpoint):
    e = HMAEnv(checkpoint=tiny_checkpoint)
    with pytest.raises(RuntimeError, match="before reset"):
        e.step(np.zeros(7, np.float32))
    obs, _ = e.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(7,\)"):
        e.step(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="finite"):
        e.step(np.full(7, np.nan, np.float32))
    bad = dict(obs)
    bad["agentview_image"] = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="agentview_image"):
        e.reset(options={"initial_observation": bad})
    with pytest.raises(ValueError, match="unknown reset options"):
        e.reset(options={"start": 1})
    obs, reward, terminated, truncated, info = e.step(np.zeros(7, np.float32))
    assert e.observation_space.contains(obs) and 0.0 <= info["success_prob"] <= 1.0
    with pytest.raises(CheckpointError, match="does not exist"):
        HMAEnv(checkpoint="/no/such/checkpoint")


def test_long_rollout_is_finite_with_flat_cache(env):
    env.reset(seed=3)
    nbytes = env.sim.cache.nbytes()
    rng = np.random.default_rng(0)
    for _ in range(200):
        obs, reward, terminated, truncated, info = env.step(rng.uniform(-1, 1, 7).astype(np.float32))
        assert all(np.all(np.isfinite(v)) for v in obs.values())
        assert env.observation_space.contains(obs)
        np.testing.assert_allclose(np.linalg.norm(obs["robot0_eef_quat"]), 1.0, rtol=1e-4)
    assert env.sim.cache.nbytes() == nbytes
    assert int(env.sim.cache.length.max()) == env.sim.wm.dynamics.config.max_frames - 1


def test_vector_env_matches_single_envs_greedy(tiny_checkpoint):
    """Greedy decoding: N envs stepped in one batch give the N single-env rollouts."""
    n, steps = 3, 5
    vec = HMAVectorEnv(num_envs=n, checkpoint=tiny_checkpoint, greedy=True, terminate_on_success=False)
    obs, _ = vec.reset(seed=[10, 11, 12])
    actions = np.random.default_rng(1).uniform(-1, 1, (steps, n, 7)).astype(np.float32)
    vec_frames = [obs["agentview_image"]]
    for a in actions:
        vec_frames.append(vec.step(a)[0]["agentview_image"])
    vec_frames = np.stack(vec_frames, 1)  # (n, steps + 1, H, W, 3)
    single = HMAEnv(checkpoint=tiny_checkpoint, greedy=True, terminate_on_success=False)
    for i in range(n):
        o, _ = single.reset(seed=10 + i)
        frames = [o["agentview_image"]] + [single.step(a[i])[0]["agentview_image"] for a in actions]
        diff = np.abs(np.stack(frames).astype(int) - vec_frames[i].astype(int))
        assert diff.mean() < 0.5, f"env {i}: mean abs pixel difference {diff.mean():.2f}"


def test_vector_env_autoreset_and_truncation(tiny_checkpoint):
    vec = HMAVectorEnv(num_envs=2, checkpoint=tiny_checkpoint, max_episode_steps=3, terminate_on_success=False)
    vec.reset(seed=0)
    zeros = np.zeros((2, 7), np.float32)
    for _ in range(2):
        _, _, term, trunc, _ = vec.step(zeros)
        assert not trunc.any()
    _, _, term, trunc, _ = vec.step(zeros)
    assert trunc.all()
    obs, reward, term, trunc, _ = vec.step(zeros)  # next-step autoreset: a fresh start, no reward
    assert not trunc.any() and (reward == 0).all()
    assert (vec.elapsed == 0).all()
    # partial reset of one env keeps the other's history
    before = vec.sim.cache.pos.clone()
    vec.reset(options={"reset_mask": np.array([True, False])})
    assert vec.sim.cache.pos.tolist() == [1, int(before[1])]


def test_registered_checkpoint_and_make_vec(tiny_checkpoint):
    hma_gym.register_checkpoint("TinyLift-v0", tiny_checkpoint, max_episode_steps=7)
    e = gym.make("TinyLift-v0")
    assert e.spec.max_episode_steps == 7
    e.reset(seed=0)
    e.close()
    vec = gym.make_vec("TinyLift-v0", num_envs=2, vectorization_mode="vector_entry_point")
    assert isinstance(vec.unwrapped, HMAVectorEnv) and vec.unwrapped.max_episode_steps == 7
    obs, _ = vec.reset(seed=0)
    assert obs["agentview_image"].shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="already registered"):
        hma_gym.register_checkpoint("TinyLift-v0", tiny_checkpoint)


def test_rollout_drives_the_vector_env_with_paired_starts(tiny_checkpoint):
    from policies import RandomPolicy

    gt = RobosuiteEnv(image_size=16)
    starts = [gt.reset(seed=s)[0] for s in (0, 1, 2)]
    vec = HMAVectorEnv(num_envs=2, checkpoint=tiny_checkpoint, max_episode_steps=4)
    result = hma_gym.rollout(vec, RandomPolicy(seed=0), 3, seeds=0,
                             reset_options=[{"initial_observation": o} for o in starts], progress=False)
    assert len(result.episodes) == 3 and all(1 <= e.length <= 4 for e in result.episodes)
    gt.close()


def test_action_log_round_trip_and_play(tiny_checkpoint, tmp_path):
    from hma_gym.action_log import ActionLog
    from hma_gym.cli import main

    log = ActionLog(env_id="HMA-RobomimicLift-v0", seed=3, env_kwargs={"checkpoint": str(tiny_checkpoint)})
    for a in np.random.default_rng(0).uniform(-1, 1, (6, 7)):
        log.append(a)
    path = tmp_path / "log.json"
    log.save(path)
    again = ActionLog.load(path)
    assert again == log
    with pytest.raises(ValueError, match="lacks"):
        ActionLog.from_dict({"version": 1, "env_id": "x"})
    with pytest.raises(ValueError, match="version"):
        ActionLog.from_dict({"version": 9, "env_id": "x", "seed": 0, "actions": []})
    main(["play", "--actions", str(path), "--out", str(tmp_path / "play.mp4")])
    assert (tmp_path / "play.mp4").stat().st_size > 1000
    # replaying twice gives the same learned frames (paired start, seeded)
    from hma_gym.play import make_pair, replay

    learned, gt = make_pair(log.env_id, log.env_kwargs)
    a = replay(log, learned.unwrapped, gt.unwrapped)
    b = replay(log, learned.unwrapped, gt.unwrapped)
    np.testing.assert_array_equal(a["learned_frames"], b["learned_frames"])
    np.testing.assert_array_equal(a["learned_frames"][0], a["gt_frames"][0])


def test_synthesize_replays_held_out_actions_and_resumes(tiny_checkpoint, tiny_data, tmp_path):
    import h5py

    from hma_gym.cli import main
    from hma_gym.data.hdf5 import list_demos, read_demo, read_env_args, validate_file

    out = tmp_path / "synth.hdf5"
    args = ["synthesize", "--actions", str(tiny_data), "--out", str(out), "--checkpoint", str(tiny_checkpoint),
            "--split", "all", "--num-envs", "3", "--valid-every", "0", "--no-progress"]
    main([*args, "--episodes", "2"])  # an "interrupted" run: 2 of the 8 demos
    assert validate_file(out)["demos"] == 2
    main(args)  # resumes: only the remaining 6
    info = validate_file(out)
    assert info["demos"] == 8
    env_args = read_env_args(out)
    assert env_args["synthetic"] is True and len(env_args["checkpoint_hash"]) == 16
    with h5py.File(out, "r") as f:
        sources = sorted(f[f"data/{n}"].attrs["source_demo"] for n in list_demos(out))
        assert "states" not in f["data/demo_0"]
    assert sources == sorted(list_demos(tiny_data))
    assert len(list_demos(out, "valid")) == 0 and len(list_demos(out, "train")) == 8  # --valid-every 0
    # each synthetic episode is as long as its source and starts from its first observation
    with h5py.File(out, "r") as f:
        first = f["data/demo_0"]
        src = read_demo(tiny_data, str(first.attrs["source_demo"]))
        assert first["actions"].shape == src["actions"].shape
        np.testing.assert_array_equal(first["obs/agentview_image"][0], src["obs"]["agentview_image"][0])
        np.testing.assert_allclose(first["actions"][()], src["actions"], rtol=1e-6)

    import robomimic.utils.obs_utils as ObsUtils
    from robomimic.utils.dataset import SequenceDataset

    ObsUtils.initialize_obs_utils_with_obs_specs({"obs": {"low_dim": ["robot0_eef_pos"], "rgb": ["agentview_image"]}})
    ds = SequenceDataset(hdf5_path=str(out), obs_keys=["agentview_image", "robot0_eef_pos"],
                         dataset_keys=["actions", "rewards", "dones"], seq_length=4, frame_stack=1,
                         pad_seq_length=True, pad_frame_stack=True, hdf5_cache_mode="low_dim",
                         filter_by_attribute="train", load_next_obs=True)
    assert ds[0]["obs"]["agentview_image"].shape == (4, 16, 16, 3)


def test_success_needs_frames_in_a_row(tiny_checkpoint):
    """The success rule: probability >= success_threshold on success_frames consecutive frames."""
    with pytest.raises(ValueError, match="success_frames"):
        HMAEnv(checkpoint=tiny_checkpoint, success_frames=0)
    with pytest.raises(ValueError, match="success_threshold"):
        HMAEnv(checkpoint=tiny_checkpoint, success_threshold=1.5)
    # a threshold every probability passes: success exactly at the k-th step, in every row
    vec = HMAVectorEnv(num_envs=2, checkpoint=tiny_checkpoint, success_frames=3, success_threshold=1e-9)
    vec.reset(seed=0)
    zeros = np.zeros((2, 7), np.float32)
    for _ in range(2):
        _, reward, terminated, _, info = vec.step(zeros)
        assert not terminated.any() and not info["is_success"].any() and (reward == 0).all()
    _, reward, terminated, _, info = vec.step(zeros)
    assert terminated.all() and info["is_success"].all() and (reward == 1).all()
    # a threshold no probability passes: never
    env = HMAEnv(checkpoint=tiny_checkpoint, success_frames=1, success_threshold=1 - 1e-9)
    env.reset(seed=0)
    for _ in range(5):
        assert not env.step(np.zeros(7, np.float32))[4]["is_success"]


def test_env_speed_times_other_model_sizes(tiny_checkpoint, tmp_path):
    """The speed benchmark's size sweep: a copy of a checkpoint with a resized, random dynamics model."""
    from benchmarks.env_speed import resized_checkpoint, size_rows

    ckpt = resized_checkpoint(tiny_checkpoint, tmp_path / "wide", d_model=48, n_layer=3, n_head=2)
    wide = HMAEnv(checkpoint=ckpt)
    base = HMAEnv(checkpoint=tiny_checkpoint)
    cfg = wide.sim.wm.dynamics.config
    assert (cfg.d_model, cfg.n_layer, cfg.n_head) == (48, 3, 2)
    assert wide.sim.wm.dynamics.num_params() > base.sim.wm.dynamics.num_params()
    obs, _ = wide.reset(seed=0)
    obs, *_ = wide.step(np.zeros(7, np.float32))
    assert np.isfinite(obs["robot0_eef_pos"]).all()
    rows = size_rows(3, str(tiny_checkpoint), ["48x3x2"], "cpu")
    assert [r["env"] for r in rows] == ["learned-single-48x3x2", "learned-vector-N16-48x3x2"]
    assert [r.get("num_envs") for r in rows] == [None, 16]
    params = wide.sim.wm.dynamics.num_params() / 1e6  # "DxLxH" timed the model of that size
    assert all(r["model"] == "48x3x2" and r["random_weights"] and r["params_dynamics_m"] == params for r in rows)
    assert not_finite_or_positive(rows) == []
    wide.close()
    base.close()


def test_env_speed_times_variants_interleaved_with_gt(tiny_checkpoint):
    """--variants: each learned env (single and N=16) timed in blocks alternating with the GT env."""
    from benchmarks.env_speed import interleaved_rows, variant_kwargs

    assert variant_kwargs("maskgit") == {"variant": "maskgit"}
    assert variant_kwargs(str(tiny_checkpoint)) == {"checkpoint": str(tiny_checkpoint)}
    assert variant_kwargs("fast+compile") == {"variant": "fast", "compile": True}
    with pytest.raises(ValueError, match="a variant is one of"):
        variant_kwargs("no/such/dir")
    with pytest.raises(ValueError, match="only option is"):
        variant_kwargs("fast+turbo")
    rows = interleaved_rows([str(tiny_checkpoint)], steps=40, device="cpu", blocks=2)
    spec = str(tiny_checkpoint)
    assert [r["env"] for r in rows] == [f"interleaved-single[{spec}]", f"interleaved-vector-N16[{spec}]"]
    for r in rows:
        assert len(r["block_ratio_to_gt"]) == len(r["gt_block_steps_per_s"]) == 2
        expected = [a / b for a, b in zip(r["block_steps_per_s"], r["gt_block_steps_per_s"], strict=True)]
        assert r["block_ratio_to_gt"] == pytest.approx(expected)
        assert r["median_ratio_to_gt"] == pytest.approx(float(np.median(expected)))
        assert r["steps_per_s"] == pytest.approx(float(np.median(r["block_steps_per_s"])))
    assert [(r["variant"], r["num_envs"]) for r in rows] == [(spec, 1), (spec, 16)]
    assert rows[0]["gt_block_steps_per_s"] == rows[1]["gt_block_steps_per_s"]  # one GT run serves both
    assert not_finite_or_positive(rows) == []



def test_env_speed_run_reports_what_it_timed(tiny_checkpoint, tmp_path, monkeypatch):
    """`python -m benchmarks.env_speed` on the tiny checkpoint: the JSON it writes has the documented keys, one row
    per configuration asked for, and every ratio and derived time recomputes from the rows it comes from. No
    timing thresholds: this machine is shared."""
    import json

    import benchmarks.common as common
    from benchmarks.env_speed import main

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    spec = str(tiny_checkpoint)
    main(["--steps", "4", "--checkpoint", spec, "--vector-sizes", "1", "16", "--long-steps", "200", "--no-compile",
          "--variants", spec])
    out = json.loads((tmp_path / "env_speed.json").read_text())
    assert set(out) == {"date", "command", "machine", "steps", "matmul_peak_gflops", "device", "learned", "rows",
                        "targets"}
    assert out["steps"] == 4 and out["device"] == "cpu"
    rows = {r["env"]: r for r in out["rows"]}
    gt = ["gt-no-camera", "gt-64px", "gt-84px", "gt-128px", "gt-84px-robosuite-default-render"]
    assert list(rows) == [*gt, "learned-single", "learned-single-no-kv-cache", "learned-vector-N1",
                          "learned-vector-N16", f"interleaved-single[{spec}]", f"interleaved-vector-N16[{spec}]"]
    assert [rows[f"learned-vector-N{n}"]["num_envs"] for n in (1, 16)] == [1, 16]
    gt64 = rows["gt-64px"]["steps_per_s"]
    for r in out["rows"]:
        assert r["ms_per_step"] == pytest.approx(1000 / r["steps_per_s"])
        assert r["ratio_to_gt_64px"] == pytest.approx(r["steps_per_s"] / gt64)
    info = out["learned"]
    assert set(info) == {"device", "checkpoint", "params_dynamics_m", "unmasking_steps", "flops_per_frame_g",
                         "achieved_gflops_single", "trunk_ms_per_frame_cached", "trunk_ms_per_frame_uncached",
                         "flatness", "fraction_of_matmul_peak"}
    assert info["checkpoint"] == spec
    assert info["params_dynamics_m"] == rows[f"interleaved-single[{spec}]"]["params_dynamics_m"]
    single = rows["learned-single"]["steps_per_s"]
    assert info["achieved_gflops_single"] == pytest.approx(info["flops_per_frame_g"] * single)
    assert info["fraction_of_matmul_peak"] == pytest.approx(info["achieved_gflops_single"] / out["matmul_peak_gflops"])
    # the no-cache row is the single step with the trunk's cached time swapped for its uncached time
    no_cache = 1 / (1 / single + (info["trunk_ms_per_frame_uncached"] - info["trunk_ms_per_frame_cached"]) / 1000)
    assert rows["learned-single-no-kv-cache"]["steps_per_s"] == pytest.approx(no_cache)
    flat = info["flatness"]
    assert (flat["steps"], flat["block"], len(flat["ms_per_step_by_block"])) == (200, 100, 2)
    assert [flat["ms_per_step_first_block"], flat["ms_per_step_last_block"]] == flat["ms_per_step_by_block"]
    assert out["targets"] == pytest.approx({
        "single_learned_vs_gt_64px": single / gt64,
        "vector16_learned_vs_gt_64px": rows["learned-vector-N16"]["steps_per_s"] / gt64,
        "kv_cache_speedup_env_step": single / rows["learned-single-no-kv-cache"]["steps_per_s"],
        "kv_cache_speedup_trunk": info["trunk_ms_per_frame_uncached"] / info["trunk_ms_per_frame_cached"],
        f"interleaved_single_{spec}_vs_gt_64px": rows[f"interleaved-single[{spec}]"]["median_ratio_to_gt"],
        f"interleaved_vector16_{spec}_vs_gt_64px": rows[f"interleaved-vector-N16[{spec}]"]["median_ratio_to_gt"]})
    assert not_finite_or_positive({k: v for k, v in out.items() if k != "machine"}) == []


def test_compiled_env_matches_eager(tiny_checkpoint):
    """compile=True: the torch.compile'd trunk, decoder and detector give the eager env's greedy rollout."""
    from torch._dynamo.utils import counters

    actions = np.random.default_rng(5).uniform(-1, 1, (4, 7)).astype(np.float32)
    graphs = counters["stats"]["unique_graphs"]
    runs = []
    for compiled in (False, True):
        env = HMAEnv(checkpoint=tiny_checkpoint, greedy=True, terminate_on_success=False, compile=compiled)
        assert env.sim.wm.compiled == compiled
        obs, _ = env.reset(seed=3)
        out = [obs]
        probs = []
        for a in actions:
            obs, _, _, _, info = env.step(a)
            out.append(obs)
            probs.append(info["success_prob"])
        runs.append((out, probs))
    assert counters["stats"]["unique_graphs"] > graphs, "compile=True compiled nothing"
    (eager, p_eager), (comp, p_comp) = runs
    for a, b in zip(eager, comp, strict=True):
        diff = np.abs(a["agentview_image"].astype(int) - b["agentview_image"].astype(int))
        assert diff.mean() < 0.5, f"mean abs pixel difference {diff.mean():.2f}"
        np.testing.assert_allclose(a["robot0_eef_pos"], b["robot0_eef_pos"], atol=1e-4)
    np.testing.assert_allclose(p_eager, p_comp, atol=1e-4)
    from benchmarks.env_speed import compiled_rows

    rows = compiled_rows(3, str(tiny_checkpoint), "cpu", sizes=())
    assert [r["env"] for r in rows] == ["learned-single-compiled"]
    assert set(rows[0]) == {"env", "compile_s", "steps_per_s", "eager_steps_per_s_interleaved", "speedup_vs_eager"}
    row = rows[0]
    assert row["speedup_vs_eager"] == pytest.approx(row["steps_per_s"] / row["eager_steps_per_s_interleaved"])
    assert not_finite_or_positive(rows) == []


def test_paired_psnr_replays_gt_episodes(tiny_checkpoint):
    """benchmarks/paired_psnr: a policy's GT episode, replayed from the paired start; PSNR pooled per horizon."""
    from benchmarks.paired_psnr import gt_episodes, summary
    from hma_gym.play import make_pair, replay
    from policies.registry import load_policy

    learned, gt = make_pair("HMA-RobomimicLift-v0", checkpoint=str(tiny_checkpoint))
    (log,) = gt_episodes(gt, load_policy("expert", gt, seed=0), seeds=[3], max_steps=5)
    assert log.seed == 3 and len(log.actions) == 5
    result = replay(log, learned, gt)
    assert result["psnr"].shape == (6,) and np.isfinite(result["psnr"][1:]).all()
    s = summary([result["psnr"], result["psnr"][:3]])
    pooled = np.concatenate([result["psnr"][1:6], result["psnr"][1:3]])
    assert s["psnr_frames_1_8"] == pytest.approx(pooled.mean()) == s["psnr_all_frames"]
    assert s["psnr_per_episode"] == pytest.approx([result["psnr"][1:].mean(), result["psnr"][1:3].mean()])
    learned.close()
    gt.close()


def test_paired_psnr_variants_name_shipped_or_own_checkpoints(tiny_checkpoint, tmp_path, monkeypatch):
    """paired_psnr --variants: "maskgit"/"mar" or a checkpoint directory, each with an optional decoding;
    anything else is refused with the reason. A whole run on one's own checkpoint writes its row."""
    import benchmarks.common
    from benchmarks import paired_psnr

    ckpt = str(tiny_checkpoint)
    assert paired_psnr.env_kwargs("mar") == {"variant": "mar"}
    assert paired_psnr.env_kwargs("maskgit:greedy") == {"variant": "maskgit", "greedy": True}
    assert paired_psnr.env_kwargs(ckpt) == {"checkpoint": ckpt}
    assert paired_psnr.env_kwargs(ckpt + ":sample") == {"checkpoint": ckpt, "greedy": False, "temperature": 1.0}
    with pytest.raises(ValueError, match="decoding must be one of"):
        paired_psnr.env_kwargs("mar:argmax")
    with pytest.raises(ValueError, match="no such directory"):
        paired_psnr.env_kwargs(str(tmp_path / "missing"))

    monkeypatch.setattr(benchmarks.common, "RESULTS", tmp_path)
    payload = paired_psnr.main(["--variants", ckpt, ckpt + ":greedy", "--episodes", "1", "--max-steps", "4",
                                "--name", "paired_test"])
    rows = payload["rows"]
    assert [r["sim"] for r in rows] == [ckpt, ckpt + ":greedy", "hold the first frame"]
    assert rows[0]["checkpoint"] == rows[1]["checkpoint"] and rows[1]["generation"]["greedy"] is True
    assert all(np.isfinite(r["psnr_all_frames"]) for r in rows)
    assert (tmp_path / "paired_test.json").exists()
