"""Does the learned sim fail what MuJoCo fails? A bank of policies whose ground-truth success spans 0 to
~1 (random and zero actions, the scripted expert clean and noisy, its failure modes at graded severities,
Diffusion Policy), each run on the same paired starts in the GT env and the learned env.

    python -m benchmarks.verdict_agreement [--episodes 50] [--seed 900000] [--checkpoint DIR | --variant V]
        [--policies NAME ...] [--num-envs 50] [--scripted replay|closed-loop] [--result verdict_agreement]

Per policy the GT env runs it closed-loop for the full episode (`max_episode_steps`, no termination on
success; success = the task predicate held at some step) and records its actions. The learned env then
starts from the same GT reset observations (paired) and runs the policy closed-loop (it reads only the
env's observations), except that the scripted policies replay their GT actions open-loop by default
(`--scripted replay`: same actions, same outcome?); `--scripted closed-loop` has them act on the learned
env's predicted gripper and cube, as a user's policy would. Actions of obs-blind policies (random, zero) are
the same in both sims, so every row is a per-episode verdict comparison on the same starts. With a state
model, each row also gives the picture's verdict (the checkpoint's pixel detector on the generated frames)
and how often it agrees with the state's (`image_state_agreement`). Seeds 900000+ are disjoint from every
collection seed of the project.

Writes benchmarks/results/RESULT.json (per policy: GT rate, learned rate, per-episode agreement, false
successes/failures, unjudged episodes, image/state agreement; over the bank: pearson, spearman, mmrv, mean
agreement) and
RESULT.png (learned vs GT success per policy, diagonal drawn).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import hma_gym
from benchmarks.common import RESULTS, write_result
from benchmarks.policy_eval_correlation import bootstrap, episode_confusion, rate_stats, scatter
from hma_gym.checkpoint import weights_hash
from hma_gym.envs.learned_env import predicted_keys
from hma_gym.envs.robosuite_env import DEFAULT_PROPRIO_KEYS
from hma_gym.tasks import OBJECT_KEY
from policies.base import ReplayPolicy
from policies.registry import SCRIPTED, load_policy

CACHE = Path("outputs/verdict")

# name -> policy spec (policies.registry.load_policy); GT success measured on seeds 900000-900049 in the
# JSON. The DP training checkpoints of the correlation study (runs/dp_lift/iter_*) are outputs of
# `make dp-lift` and join with --policies NAME=DIR.
BANK: dict[str, str] = {
    "random": "random",
    "random_smooth": "random-smooth",
    "zero": "zero",
    "never_close": "lift-expert:never_close",
    "push_3cm": "lift-expert:push=0.03",
    "close_early_6cm": "lift-expert:close_early=0.065",
    "missed_6cm": "lift-expert:missed_grasp=0.06",
    "missed_4cm": "lift-expert:missed_grasp=0.04",
    "missed_3cm": "lift-expert:missed_grasp=0.03",
    "missed_2cm": "lift-expert:missed_grasp=0.02",
    "close_late_1cm": "lift-expert:close_late=0.01",
    "close_late_3cm": "lift-expert:close_late=0.03",
    "release_5mm": "lift-expert:release_mid_lift=0.005",
    "noisy_expert_0.6": "lift-expert:noise=0.6",
    "noisy_expert_0.3": "lift-expert:noise=0.3",
    "expert": "lift-expert",
    "dp_lift": "dp-lift",
}


def parse_policies(items: list[str] | None) -> dict[str, str]:
    """Bank names, or NAME=SPEC pairs for policies outside the bank."""
    if not items:
        return dict(BANK)
    out = {}
    for item in items:
        name, eq, spec = item.partition("=")
        if not eq and name not in BANK:
            raise SystemExit(f"unknown bank policy {name!r}; bank: {sorted(BANK)} (or NAME=SPEC)")
        out[name] = spec if eq else BANK[name]
    return out


def run_gt(spec: str, seeds: list[int], max_steps: int, policy_seed: int, obs_keys: tuple[str, ...] | None = None,
           ) -> tuple[list[bool], list[np.ndarray], list]:
    """GT verdicts, action sequences and reset observations (of `obs_keys`) of one policy on `seeds`, cached in
    outputs/verdict/ (the GT side does not depend on the learned model: one run serves every checkpoint)."""
    key = json.dumps([spec, seeds[0], len(seeds), max_steps, policy_seed, sorted(obs_keys or [])])
    cache = CACHE / f"gt_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        n = len(seeds)
        starts = [{k[6:]: z[k][i] for k in z.files if k.startswith("start/")} for i in range(n)]
        return [bool(x) for x in z["success"]], [z[f"actions/{i}"] for i in range(n)], starts
    env = gym.make("RobomimicLift-v0", terminate_on_success=False, max_episode_steps=max_steps, obs_keys=obs_keys)
    policy = load_policy(spec, env, seed=policy_seed)
    actions: dict[int, list[np.ndarray]] = {}
    starts: dict[int, dict] = {}

    def record(i, obs, action, reward, next_obs, info):
        if i not in starts:
            starts[i] = obs
        actions.setdefault(i, []).append(np.asarray(action, np.float32))

    result = hma_gym.rollout(env, policy, len(seeds), seeds=seeds, on_step=record, desc=f"{spec} @ GT")
    env.close()
    out = ([e.success for e in result.episodes], [np.stack(actions[i]) for i in range(len(seeds))],
           [starts[i] for i in range(len(seeds))])
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, success=np.asarray(out[0]), **{f"actions/{i}": a for i, a in enumerate(out[1])},
                        **{f"start/{k}": np.stack([s[k] for s in out[2]]) for k in out[2][0]})
    return out


def run_learned(spec: str, seeds: list[int], starts: list[dict], gt_actions: list[np.ndarray], env_kwargs: dict,
                num_envs: int, max_steps: int, policy_seed: int, scripted: str = "replay") -> dict:
    keys = predicted_keys(env_kwargs.get("checkpoint"), env_kwargs.get("variant", "maskgit"))  # `object` too
    env = gym.make_vec("HMA-RobomimicLift-v0", num_envs=min(num_envs, len(seeds)),
                       vectorization_mode="vector_entry_point", obs_keys=keys, **env_kwargs)
    # scripted policies replay their GT actions even where the learned env returns `object` (they could act
    # on it): a closed-loop expert needs the predicted gripper and cube to within ~1 cm to reach its grasp,
    # so its row would measure hovering, not the failure mode it stands for
    closed_loop = scripted == "closed-loop" or spec.partition(":")[0] not in SCRIPTED
    if closed_loop and "object" not in env.single_observation_space.spaces and spec.partition(":")[0] in SCRIPTED:
        raise SystemExit("--scripted closed-loop needs a checkpoint that predicts the object state")
    if closed_loop:
        policy = load_policy(spec, env, seed=policy_seed)
    else:  # replay the GT actions of each episode; the rollout runs episodes wave by wave, one per env
        policy = WaveReplay(gt_actions, env.num_envs)
    keys = set(env.single_observation_space.spaces)
    options = [{"initial_observation": {k: v for k, v in s.items() if k in keys}} for s in starts]
    unjudged: dict[int, bool] = {}
    # the picture's own verdict, where the state model gives the env's: the checkpoint's pixel detector on each
    # generated frame (with the predicted proprio), so that image and state can be checked to tell one story
    sim = env.unwrapped.sim
    image_success: dict[int, bool] = {}
    threshold = float(sim.config.get("generation", {}).get("success_threshold", sim.wm.threshold))
    with_detector = sim.state_model is not None and sim.wm.detector is not None

    def record(i, obs, action, reward, next_obs, info):
        if info.get("unjudged"):
            unjudged[i] = True
        if with_detector and not image_success.get(i):
            frame = torch.from_numpy(np.ascontiguousarray(next_obs[sim.image_key]))[None]
            state = torch.from_numpy(sim.state_vector({k: v[None] for k, v in next_obs.items()}))
            image_success[i] = bool(sim.wm.success_prob(frame, state)[0] >= threshold)

    t0 = time.perf_counter()
    result = hma_gym.rollout(env, policy, len(seeds), seeds=seeds, reset_options=options,
                             max_steps=max_steps, on_step=record, desc=f"{spec} @ learned")
    wall = time.perf_counter() - t0
    checkpoint = str(env.unwrapped.sim.checkpoint)
    env.close()
    return {"success": [e.success for e in result.episodes], "lengths": [e.length for e in result.episodes],
            "unjudged": [bool(unjudged.get(i)) for i in range(len(seeds))], "mode":
            "closed-loop" if closed_loop else "replay", "wall_s": wall, "checkpoint": checkpoint,
            "image_success": [bool(image_success.get(i)) for i in range(len(seeds))] if with_detector else None}


class WaveReplay(ReplayPolicy):
    """Replays episode e's actions in env slot e % n_envs (the rollout's wave order); the last action
    repeats past the end of a sequence, so a held cube stays held."""

    def __init__(self, actions: list[np.ndarray], n_envs: int):
        self.all, self.n_envs, self.wave = actions, n_envs, -1
        super().__init__(actions[:n_envs])

    def reset(self, env_ids=None) -> None:
        if env_ids is None:  # a new wave
            self.wave += 1
            chunk = self.all[self.wave * self.n_envs:(self.wave + 1) * self.n_envs]
            chunk = chunk + [chunk[0]] * (self.n_envs - len(chunk))  # the rollout's padding slots
            self.actions = [np.concatenate([a, np.repeat(a[-1:], 200, 0)]) for a in chunk]
        super().reset(env_ids)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", nargs="*", help="bank names or NAME=SPEC (default: the whole bank)")
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=900_000, help="episode seeds seed..seed+n-1 (held out)")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--checkpoint", default="", help="learned env checkpoint directory")
    parser.add_argument("--variant", default="", help="a shipped variant (maskgit, fast, fsq15k, mar)")
    parser.add_argument("--num-envs", type=int, default=50, help="learned envs stepped in one model call")
    parser.add_argument("--policy-seed", type=int, default=0)
    parser.add_argument("--scripted", choices=("replay", "closed-loop"), default="replay",
                        help="scripted policies: replay their GT actions (same actions, same outcome?) or act on "
                             "the learned env's own predicted state, as a user's policy does")
    parser.add_argument("--result", default="verdict_agreement", help="name of the result JSON/PNG")
    parser.add_argument("--gt-only", action="store_true",
                        help="only run (and cache in outputs/verdict/) the GT side, e.g. while a model trains")
    args = parser.parse_args(argv)
    hma_gym.register_envs()
    env_kwargs = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    if args.variant:
        env_kwargs["variant"] = args.variant
    seeds = list(range(args.seed, args.seed + args.episodes))
    # the GT side records every key a model's paired start may need (robomimic's `object` too), so its cache
    # serves every checkpoint
    gt_keys = ("agentview_image", *DEFAULT_PROPRIO_KEYS, OBJECT_KEY)
    rows, gt_all, learned_all, judged_all = [], [], [], []
    for name, spec in parse_policies(args.policies).items():
        t0 = time.perf_counter()
        gt, actions, starts = run_gt(spec, seeds, args.max_steps, args.policy_seed, gt_keys)
        gt_s = time.perf_counter() - t0
        if args.gt_only:
            print(f"{name}: GT success {np.mean(gt):.2f} ({gt_s:.0f} s)", flush=True)
            continue
        learned = run_learned(spec, seeds, starts, actions, env_kwargs, args.num_envs, args.max_steps,
                              args.policy_seed, scripted=args.scripted)
        confusion = episode_confusion([{"success": s} for s in gt], [{"success": s} for s in learned["success"]])
        judged = [(g == v) for g, v, u in zip(gt, learned["success"], learned["unjudged"], strict=True) if not u]
        judged_all += judged
        rows.append({"name": name, "policy": spec, "learned_mode": learned["mode"],
                     "gt_success": float(np.mean(gt)), "learned_success": float(np.mean(learned["success"])),
                     **confusion, "unjudged": int(sum(learned["unjudged"])),
                     "judged_agreement": float(np.mean(judged)) if judged else None,
                     "learned_mean_length": float(np.mean(learned["lengths"])),
                     **({} if learned["image_success"] is None else {
                         "image_success": float(np.mean(learned["image_success"])),
                         "image_state_agreement": float(np.mean(np.equal(learned["image_success"],
                                                                         learned["success"])))}),
                     "wall_s": {"gt": gt_s, "learned": learned["wall_s"]},
                     "per_episode": {"gt": gt, "learned": learned["success"], "unjudged": learned["unjudged"]}})
        gt_all.append(rows[-1]["gt_success"])
        learned_all.append(rows[-1]["learned_success"])
        print({k: v for k, v in rows[-1].items() if k != "per_episode"}, flush=True)
    if args.gt_only:
        return {}
    stats = rate_stats(gt_all, learned_all)
    checkpoint = learned["checkpoint"]
    verdicts = [[r["per_episode"][side] for r in rows] for side in ("gt", "learned")]
    payload = {
        **stats,
        "bootstrap_ci95": bootstrap(*verdicts, 2000),
        "mean_per_episode_agreement": float(np.mean([r["per_episode_agreement"] for r in rows])),
        # over the episodes the checkpoint's uncertainty limit leaves judged, pooled over the bank
        "judged_episode_agreement": float(np.mean(judged_all)) if judged_all else None,
        "judged_episodes": len(judged_all),
        **({"mean_image_state_agreement": float(np.mean([r["image_state_agreement"] for r in rows]))}
           if rows and "image_state_agreement" in rows[0] else {}),
        "max_abs_rate_error": float(max(abs(g - lr) for g, lr in zip(gt_all, learned_all, strict=True))),
        "episodes_per_policy": args.episodes,
        "seeds": [seeds[0], seeds[-1]],
        "max_steps": args.max_steps,
        "checkpoint": checkpoint,
        "checkpoint_weights_hash": weights_hash(checkpoint),
        "env_kwargs": env_kwargs,
        "policies": rows,
    }
    scatter(rows, RESULTS / f"{args.result}.png", stats)
    write_result(args.result, payload, module="verdict_agreement")
    return payload


if __name__ == "__main__":
    main()
