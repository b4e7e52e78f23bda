"""Policies by name or path, for the CLI and studies."""

from __future__ import annotations

import os
from pathlib import Path

import gymnasium as gym

SCRIPTED = ("expert", "lift-expert")


def load_policy(spec: str, env: gym.Env | gym.vector.VectorEnv | None = None, seed: int = 0,
                device: str = "cpu", trust_pickle: bool = False):
    """A batched policy from a spec:

    - `expert` / `lift-expert`: the scripted Lift expert (needs a ground-truth env: privileged state);
    - `random`: uniform random actions;
    - `dp-lift` (the shipped Diffusion Policy) or a Diffusion Policy checkpoint directory;
    - `sb3:ALGO:PATH`: a stable-baselines3 model zip (e.g. `sb3:PPO:runs/ppo.zip`), rebuilt for `env`'s spaces
      from its state dict without unpickling (PPO, A2C, SAC, TD3, DDPG); `trust_pickle=True` loads it with
      SB3's own loader instead, which runs any code the file holds.
    """
    if spec in SCRIPTED:
        from policies.scripted import LiftExpert

        if env is None:
            raise ValueError("the scripted expert is bound to a ground-truth env; pass env=")
        envs = env.envs if hasattr(env, "envs") else [env]
        if not all(hasattr(e.unwrapped, "privileged_state") for e in envs):
            raise ValueError("the scripted expert needs privileged state: it runs only in ground-truth envs")
        return LiftExpert(env, seed=seed)
    if spec == "random":
        from policies.base import RandomPolicy

        dim = 7
        if env is not None:
            space = getattr(env, "single_action_space", env.action_space)
            dim = int(space.shape[0])
        return RandomPolicy(action_dim=dim, seed=seed)
    if spec.startswith("sb3:"):
        from policies.sb3 import SB3Policy

        return SB3Policy.load(spec[4:], env, device=device, trust_pickle=trust_pickle)
    if spec == "dp-lift" or (Path(spec) / "policy.json").exists():
        from policies.diffusion import load_diffusion_policy

        return load_diffusion_policy(spec, device=device, seed=seed)
    if os.path.exists(spec):
        raise ValueError(f"{spec} is not a policy checkpoint directory (no policy.json)")
    raise ValueError(f"unknown policy {spec!r}: use expert, random, dp-lift, a DP checkpoint dir or sb3:ALGO:PATH")
