"""Scripted Stack expert: pick cube A, carry it over cube B, set it down, let go."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from policies.scripted import eef_actions, osc_action, sub_envs

# phases of one episode
APPROACH, DESCEND, GRASP, RAISE, CARRY, LOWER, RELEASE, RETREAT = range(8)


@dataclass
class StackExpertConfig:
    """Behaviour of the scripted Stack expert."""

    action_noise: float = 0.0
    """Std of Gaussian noise added to the position/rotation actions (before clipping)."""
    gain: float = 10.0
    """Proportional gain from position error (m) to normalised OSC action."""
    hover_height: float = 0.06
    """Height above cube A at which the gripper lines up before descending (m)."""
    carry_height: float = 0.10
    """Clearance of cube A's bottom over cube B's top while carrying (m)."""
    grasp_steps: int = 8
    """Steps spent closing (and later opening) the gripper."""

    def __post_init__(self):
        if self.action_noise < 0:
            raise ValueError(f"action_noise must be >= 0. Got {self.action_noise=}")


class StackExpert:
    """A batched Stack policy from privileged state (cube positions and sizes); end-effector moves only,
    so like `LiftExpert` it drives any arm under OSC_POSE (7-D) or OSC_POSITION (4-D)."""

    def __init__(self, env, config: StackExpertConfig | None = None, seed: int | None = None):
        self.envs = sub_envs(env)
        self.config = config or StackExpertConfig()
        self.rng = np.random.default_rng(seed)
        n = len(self.envs)
        self.phase = np.zeros(n, dtype=np.int64)
        self.counter = np.zeros(n, dtype=np.int64)
        self.hold = np.zeros((n, 3))  # cube A centre minus gripper, measured when the grasp closes
        self.reset()

    def reset(self, env_ids: Sequence[int] | None = None) -> None:
        for i in range(len(self.envs)) if env_ids is None else env_ids:
            self.phase[i], self.counter[i] = APPROACH, 0
            self.hold[i] = 0.0

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return eef_actions("StackExpert", self.envs, obs, self._act_one)

    def _act_one(self, i: int, eef: np.ndarray) -> np.ndarray:
        cfg = self.config
        rs = self.envs[i]._rs
        state = self.envs[i].privileged_state()
        a_pos, b_pos = state["cubeA_pos"], state["cubeB_pos"]
        ha, hb = rs.cubeA.size[2], rs.cubeB.size[2]
        gripper = -1.0
        if self.phase[i] == APPROACH:
            target = a_pos + np.array([0.0, 0.0, cfg.hover_height])
            if np.linalg.norm((target - eef)[:2]) < 0.01 and abs((target - eef)[2]) < 0.02:
                self.phase[i] = DESCEND
        if self.phase[i] == DESCEND:
            target = a_pos + np.array([0.0, 0.0, -0.005])
            self.counter[i] += 1
            # a finger resting on the cube's edge blocks the descent: close where it stands after a while
            if (abs((target - eef)[2]) < 0.01 and np.linalg.norm((target - eef)[:2]) < 0.015) or self.counter[i] > 25:
                self.phase[i], self.counter[i] = GRASP, 0
        if self.phase[i] == GRASP:
            target, gripper = eef.copy(), 1.0
            self.counter[i] += 1
            if self.counter[i] >= cfg.grasp_steps:
                self.phase[i], self.hold[i] = RAISE, a_pos - eef
        # while holding, steer cube A (eef + hold) rather than the gripper
        carry_z = b_pos[2] + hb + ha + cfg.carry_height
        if self.phase[i] == RAISE:
            gripper = 1.0
            target = np.array([eef[0], eef[1], carry_z]) - np.array([0.0, 0.0, self.hold[i][2]])
            if abs((target - eef)[2]) < 0.02:
                self.phase[i] = CARRY
        if self.phase[i] == CARRY:
            gripper = 1.0
            target = np.array([b_pos[0], b_pos[1], carry_z]) - self.hold[i]
            if np.linalg.norm((target - eef)[:2]) < 0.008:
                self.phase[i] = LOWER
        if self.phase[i] == LOWER:
            gripper = 1.0
            target = np.array([b_pos[0], b_pos[1], b_pos[2] + hb + ha + 0.005]) - self.hold[i]
            if abs((target - eef)[2]) < 0.006:
                self.phase[i], self.counter[i] = RELEASE, 0
        if self.phase[i] == RELEASE:
            target = eef.copy()
            self.counter[i] += 1
            if self.counter[i] >= cfg.grasp_steps:
                self.phase[i] = RETREAT
        if self.phase[i] == RETREAT:
            target = np.array([eef[0], eef[1], b_pos[2] + 0.2])
        return osc_action(np.clip(cfg.gain * (target - eef), -1.0, 1.0), gripper, cfg.action_noise, self.rng)

    def describe(self) -> dict:
        return {"policy": "stack-expert", **asdict(self.config)}
