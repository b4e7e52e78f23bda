"""Policies by name or path, for the CLI and studies."""

from __future__ import annotations

import os
from pathlib import Path

import gymnasium as gym

SCRIPTED = ("expert", "lift-expert")


def load_policy(spec: str, env: gym.Env | gym.vector.VectorEnv | None = None, seed: int = 0,
                device: str = "cpu", trust_pickle: bool = False):
    """A batched policy from a spec:

    - `expert` / `lift-expert`: the scripted Lift expert (needs a ground-truth env's privileged state, or an
      env that returns the `object` observation); `lift-expert:OPTIONS` sets its behaviour, e.g.
      `lift-expert:never_close`, `lift-expert:missed_grasp=0.03`, `lift-expert:noise=0.2`
      (see `policies.scripted.expert_config_from_spec`);
    - `random`: uniform random actions; `random-smooth` or `random-smooth:RHO`: temporally correlated
      random actions (AR(1), rho 0.9 by default); `zero`: the zero action (the arm holds still);
    - `dp-lift` (the shipped Diffusion Policy) or a Diffusion Policy checkpoint directory;
    - `sb3:ALGO:PATH`: a stable-baselines3 model zip (e.g. `sb3:PPO:runs/ppo.zip`), rebuilt for `env`'s spaces
      from its state dict without unpickling (PPO, A2C, SAC, TD3, DDPG); `trust_pickle=True` loads it with
      SB3's own loader instead, which runs any code the file holds.
    """
    name, _, options = spec.partition(":")
    if name in SCRIPTED:
        from hma_gym.tasks import OBJECT_KEY
        from policies.scripted import LiftExpert, expert_config_from_spec

        if env is None:
            raise ValueError("the scripted expert is bound to an env; pass env=")
        config = expert_config_from_spec(options)
        envs = env.envs if hasattr(env, "envs") else [env]
        if not all(hasattr(e.unwrapped, "privileged_state")
                   or OBJECT_KEY in getattr(e, "single_observation_space", e.observation_space).spaces for e in envs):
            raise ValueError("the scripted expert needs privileged state or the 'object' observation: it runs in "
                             "ground-truth envs, or in learned envs made with obs_keys including 'object'")
        return LiftExpert(env, config, seed=seed)
    if name in ("random", "random-smooth", "zero"):
        from policies.base import ConstantPolicy, RandomPolicy, SmoothRandomPolicy

        dim = 7
        if env is not None:
            space = getattr(env, "single_action_space", env.action_space)
            dim = int(space.shape[0])
        if name == "zero":
            return ConstantPolicy(action_dim=dim)
        if name == "random":
            return RandomPolicy(action_dim=dim, seed=seed)
        try:
            rho = float(options) if options else 0.9
        except ValueError:
            raise ValueError(f"random-smooth:RHO takes a number in [0, 1), got {options!r}") from None
        return SmoothRandomPolicy(action_dim=dim, rho=rho, seed=seed)
    if spec.startswith("sb3:"):
        from policies.sb3 import SB3Policy

        return SB3Policy.load(spec[4:], env, device=device, trust_pickle=trust_pickle)
    if spec == "dp-lift" or (Path(spec) / "policy.json").exists():
        from policies.diffusion import load_diffusion_policy

        return load_diffusion_policy(spec, device=device, seed=seed)
    if os.path.exists(spec):
        raise ValueError(f"{spec} is not a policy checkpoint directory (no policy.json)")
    raise ValueError(f"unknown policy {spec!r}: use expert[:OPTIONS], random, random-smooth, zero, dp-lift, "
                     "a DP checkpoint dir or sb3:ALGO:PATH")
