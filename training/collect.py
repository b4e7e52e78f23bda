"""`hma-gym collect`: roll a policy in the GT env into robomimic HDF5.

The default policy is the scripted expert with action noise and failure modes; `--policy` records any
other policy instead (e.g. an imperfect Diffusion Policy checkpoint, so that the world model sees the
failures such policies make: the paper trains on successful and failed interactions alike).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import gymnasium as gym

import hma_gym
from hma_gym.data.hdf5 import RobomimicWriter, list_demos, validate_file
from hma_gym.envs.robosuite_env import DEFAULT_PROPRIO_KEYS
from hma_gym.tasks import OBJECT_KEY
from policies.registry import SCRIPTED, load_policy
from policies.scripted import LiftExpert, LiftExpertConfig
from policies.stack import StackExpert, StackExpertConfig
from training.mixture import embodiment_name

TASK_IDS = {"lift": "RobomimicLift-v0", "stack": "RobomimicStack-v0"}


@dataclass
class CollectConfig:
    """Collect robomimic-layout demos from a ground-truth env."""

    out: str = "data/lift.hdf5"
    """Output HDF5 file; an existing file is appended to."""
    task: str = "lift"
    """Task name: lift or stack (the scripted experts of both drive any of the robots below)."""
    robot: str = "Panda"
    """robosuite robot (the scripted expert drives Panda, Sawyer, IIWA, UR5e, Kinova3)."""
    controller: str = "OSC_POSE"
    """robosuite arm controller: OSC_POSE (7-D actions) or OSC_POSITION (4-D)."""
    control_freq: int = 20
    """Control frequency in Hz (train with --action-stride to bring other rates to the model's)."""
    max_steps: int = 0
    """Episode step limit (0 = the registered one: 100 for Lift at 20 Hz)."""
    policy: str = "expert"
    """expert (the task's scripted expert: Lift's with noise and failure modes, Stack's with noise), random,
    dp-lift, a DP checkpoint dir or sb3:ALGO:PATH."""
    trust_pickle: bool = False
    """sb3:ALGO:PATH only: load the zip with SB3's own loader, which unpickles it and so runs any code it holds
    (files you trust only); by default PPO/A2C/SAC/TD3/DDPG zips are rebuilt from their state dict."""
    episodes: int = 200
    """Number of episodes to add."""
    total: int = 0
    """Collect until the file holds this many demos instead (0: add --episodes); rerunning a killed
    collection with the same --total then finishes it, and a finished one adds nothing."""
    seed: int = 0
    """Base seed: episode k of the file starts from seed + k, so appends never repeat a start."""
    image_size: int = 64
    """Camera image size in pixels."""
    action_noise: float = 0.05
    """Std of Gaussian noise on the expert's motion actions."""
    failure_probs: dict[str, float] = field(
        default_factory=lambda: {"missed_grasp": 0.1, "early_release": 0.1, "hesitation": 0.15}
    )
    """Per-episode probability of each expert failure mode (JSON on the command line): missed_grasp,
    early_release, hesitation, never_close, close_early, close_late, release_mid_lift, push."""
    severity: dict[str, list[float]] = field(default_factory=dict)
    """Severity range [lo, hi] in metres of graded failure modes (JSON), e.g. {"missed_grasp": [0, 0.06]};
    unnamed modes keep policies.scripted.DEFAULT_SEVERITY."""
    steps_after_success: int = 10
    """Steps recorded after the first success (success frames should not be rare)."""
    valid_every: int = 10
    """Every n-th demo goes to mask/valid."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self):
        if self.task not in TASK_IDS:
            raise ValueError(f"task must be one of {sorted(TASK_IDS)}. Got {self.task=}")
        if self.total < 0:
            raise ValueError(f"total must be >= 0. Got {self.total=}")
        if self.episodes <= 0:
            raise ValueError(f"episodes must be positive. Got {self.episodes=}")
        if self.policy == "lift-expert" and self.task != "lift":
            raise ValueError(f"lift-expert drives the lift task only; use --policy expert for {self.task}")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0. Got {self.max_steps=}")
        self.expert_config()

    def expert_config(self) -> LiftExpertConfig:
        return LiftExpertConfig(action_noise=self.action_noise, failure_probs=self.failure_probs,
                                severity={k: tuple(v) for k, v in self.severity.items()})


def collect(cfg: CollectConfig) -> dict:
    env_id = TASK_IDS[cfg.task]
    limit = {"max_episode_steps": cfg.max_steps} if cfg.max_steps else {}
    # every file records robomimic's `object` key beside the default observation (the verdict's state)
    obs_keys = ("agentview_image", *DEFAULT_PROPRIO_KEYS, OBJECT_KEY)
    env = gym.make(env_id, image_size=cfg.image_size, terminate_on_success=False, robot=cfg.robot,
                   controller=cfg.controller, control_freq=cfg.control_freq, obs_keys=obs_keys, **limit)
    env_args = env.unwrapped.env_args()
    env_args["embodiment"] = embodiment_name(cfg.robot, cfg.controller, cfg.control_freq)
    scripted = cfg.policy in SCRIPTED
    expert = f"{cfg.task}-expert"
    env_args.update(env_id=env_id, synthetic=False, collector=expert if scripted else cfg.policy)
    if scripted:
        env_args["expert"] = {"action_noise": cfg.action_noise}
        if cfg.task == "lift":
            env_args["expert"]["failure_probs"] = cfg.failure_probs
            env_args["expert"]["severity"] = cfg.severity
    writer = RobomimicWriter(cfg.out, env_args, valid_every=cfg.valid_every)
    already = len(list_demos(cfg.out))
    n_episodes = max(0, cfg.total - already) if cfg.total else cfg.episodes
    if n_episodes == 0:
        env.close()
        print(f"{cfg.out} already holds {already} demos (--total {cfg.total}): nothing to collect")
        return {"out": cfg.out, "policy": cfg.policy, "episodes_added": 0}
    if scripted and cfg.task == "stack":
        policy = StackExpert(env, StackExpertConfig(action_noise=cfg.action_noise), seed=cfg.seed + already)
    elif scripted:
        policy = LiftExpert(env, cfg.expert_config(), seed=cfg.seed + already)
    else:
        policy = load_policy(cfg.policy, env, seed=cfg.seed + already, trust_pickle=cfg.trust_pickle)
    t0 = time.perf_counter()
    result = hma_gym.rollout(env, policy, n_episodes, seeds=cfg.seed + already, writer=writer,
                             steps_after_success=cfg.steps_after_success, progress=cfg.progress, desc="collect")
    minutes = (time.perf_counter() - t0) / 60
    env.close()
    summary = validate_file(cfg.out)
    report = {
        "out": cfg.out,
        "policy": cfg.policy,
        "episodes_added": n_episodes,
        "success_rate": result.success_rate,
        "mean_length": result.mean_length,
        "episodes_per_minute": n_episodes / minutes,
        "env_steps_per_s": result.steps_per_s,
        "file": {k: v for k, v in summary.items() if k != "env_args"},
    }
    print(json.dumps(report, indent=2))
    return report
