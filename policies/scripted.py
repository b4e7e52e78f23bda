"""Scripted Lift expert from privileged state, with knobs for noise and failure modes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import gymnasium as gym
import numpy as np

from hma_gym.tasks import LIFT as LIFT_TASK
from hma_gym.tasks import OBJECT_KEY
from policies.base import batch_size_of

FAILURE_MODES = ("missed_grasp", "early_release", "hesitation", "never_close", "close_early", "close_late",
                 "release_mid_lift", "push")

# Severity of each graded failure mode, in metres, drawn per episode from [lo, hi]:
# missed_grasp: horizontal offset of the grasp from the cube centre; close_early: height above the grasp
# point at which the gripper closes (it then descends closed; the hover height, 6.5 cm, at most); close_late:
# how far the arm rises with the gripper open before it closes; release_mid_lift: how far the cube is lifted
# before the gripper opens; push: how far past the cube centre the open gripper sweeps at cube height.
DEFAULT_SEVERITY: dict[str, tuple[float, float]] = {
    "missed_grasp": (0.035, 0.05),
    "close_early": (0.02, 0.065),
    "close_late": (0.005, 0.04),
    "release_mid_lift": (0.0, 0.04),
    "push": (0.0, 0.06),
}

# phases of one episode
APPROACH, DESCEND, GRASP, LIFT, RELEASED, PUSH = range(6)


@dataclass
class LiftExpertConfig:
    """Behaviour of the scripted Lift expert."""

    action_noise: float = 0.0
    """Std of Gaussian noise added to the position/rotation actions (before clipping)."""
    failure_probs: dict[str, float] = field(default_factory=dict)
    """Per-episode probability of each failure mode: missed_grasp (grasps beside the cube),
    early_release (lets go of the cube before lifting), hesitation (pauses and wanders), never_close (the
    gripper stays open), close_early (closes above the cube, then descends closed), close_late (rises
    before closing), release_mid_lift (opens during the lift), push (sweeps the open gripper through the
    cube at table height)."""
    severity: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Severity range (m) of graded failure modes, overriding DEFAULT_SEVERITY (see there)."""
    gain: float = 10.0
    """Proportional gain from position error (m) to normalised OSC action."""
    hover_height: float = 0.06
    """Height above the cube at which the gripper lines up before descending (m)."""
    lift_height: float = 0.25
    """How far the cube is lifted (m)."""
    grasp_steps: int = 8
    """Steps spent closing the gripper before lifting."""

    def __post_init__(self):
        unknown = set(self.failure_probs) - set(FAILURE_MODES)
        if unknown:
            raise ValueError(f"unknown failure modes {sorted(unknown)}; choose from {FAILURE_MODES}")
        total = sum(self.failure_probs.values())
        if any(p < 0 for p in self.failure_probs.values()) or total > 1 + 1e-9:
            raise ValueError(f"failure_probs must be >= 0 and sum to at most 1. Got {self.failure_probs=}")
        if self.action_noise < 0:
            raise ValueError(f"action_noise must be >= 0. Got {self.action_noise=}")
        unknown = set(self.severity) - set(DEFAULT_SEVERITY)
        if unknown:
            raise ValueError(f"no severity for {sorted(unknown)}; graded modes are {sorted(DEFAULT_SEVERITY)}")
        for mode, bounds in self.severity.items():
            if len(bounds) != 2 or not 0 <= bounds[0] <= bounds[1] <= 0.3:
                raise ValueError(f"severity[{mode!r}] must be [lo, hi] with 0 <= lo <= hi <= 0.3 m. Got {bounds}")
        self.severity = {k: (float(v[0]), float(v[1])) for k, v in self.severity.items()}

    def severity_range(self, mode: str) -> tuple[float, float]:
        return self.severity.get(mode, DEFAULT_SEVERITY[mode])


def sub_envs(env) -> list:
    """The unwrapped single envs behind a single env or a gymnasium vector env of them (a natively batched
    env, such as the learned one, stands for each of its rows)."""
    if hasattr(env, "envs"):  # SyncVectorEnv
        return [e.unwrapped for e in env.envs]
    if isinstance(env.unwrapped, gym.vector.VectorEnv):
        return [env.unwrapped] * env.unwrapped.num_envs
    return [env.unwrapped]


def eef_actions(name: str, envs: list, obs: dict[str, np.ndarray],
                act_one: Callable[[int, np.ndarray], np.ndarray]) -> np.ndarray:
    """A batch of actions of an end-effector expert bound to `envs`, in their action space.

    `act_one(i, eef_pos)` gives env i's 7-D OSC_POSE action; OSC_POSITION arms (4-D) get it without
    the rotation deltas.
    """
    n = batch_size_of(obs)
    if n != len(envs):
        raise ValueError(f"{name} is bound to {len(envs)} envs, got a batch of {n}")
    dim = getattr(envs[0], "single_action_space", envs[0].action_space).shape[0]
    if dim not in (4, 7):
        raise ValueError(f"{name} drives OSC_POSE (7-D) or OSC_POSITION (4-D) arms; the action is {dim}-D")
    actions = np.zeros((n, dim), dtype=np.float32)
    for i in range(n):
        a = act_one(i, np.asarray(obs["robot0_eef_pos"][i], dtype=np.float64))
        actions[i] = a if dim == 7 else a[[0, 1, 2, 6]]
    return actions


def osc_action(move: np.ndarray, gripper: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    """7-D OSC_POSE action from a position move and a gripper command, noise on the 6 motion dims, clipped."""
    action = np.zeros(7)
    action[:3] = move
    action[6] = gripper
    if noise > 0:
        action[:6] += rng.normal(0.0, noise, 6)
    return np.clip(action, -1.0, 1.0)


class LiftExpert:
    """Hover above the cube, descend, close, lift: a batched policy driven by privileged state.

    It moves the end effector only, so it drives any robosuite arm (Panda, Sawyer, IIWA, UR5e,
    Kinova3 measured) under OSC_POSE (7-D actions) or OSC_POSITION (4-D: no rotation deltas).

    The expert is bound to the env(s) it acts in (a `RobosuiteEnv`, or a `SyncVectorEnv` of them)
    and reads the cube position through `privileged_state()`; the observation gives the gripper
    position. Each episode draws one behaviour from `config.failure_probs` (or the clean expert),
    from its own seeded generator, so collected data holds both successes and failures.
    """

    def __init__(self, env, config: LiftExpertConfig | None = None, seed: int | None = None):
        self.envs = sub_envs(env)
        self.config = config or LiftExpertConfig()
        self.rng = np.random.default_rng(seed)
        n = len(self.envs)
        self.phase = np.zeros(n, dtype=np.int64)
        self.counter = np.zeros(n, dtype=np.int64)
        self.mode: list[str] = ["clean"] * n
        self.grasp_offset = np.zeros((n, 3))
        self.amount = np.zeros(n)  # the episode's severity (m) of its graded failure mode
        self.lift_origin = np.zeros((n, 3))
        self.release_step = np.zeros(n, dtype=np.int64)
        self.pause_left = np.zeros(n, dtype=np.int64)
        self.wander = np.zeros((n, 3))
        self.reset()

    def reset(self, env_ids: Sequence[int] | None = None) -> None:
        ids = range(len(self.envs)) if env_ids is None else env_ids
        modes = ["clean", *self.config.failure_probs]
        probs = [1.0 - sum(self.config.failure_probs.values()), *self.config.failure_probs.values()]
        for i in ids:
            self.phase[i], self.counter[i], self.pause_left[i] = APPROACH, 0, 0
            self.mode[i] = str(self.rng.choice(modes, p=np.clip(probs, 0, None) / sum(probs)))
            self.grasp_offset[i] = 0.0
            sideways = self.mode[i] in ("missed_grasp", "push")
            angle = self.rng.uniform(0, 2 * np.pi) if sideways else 0.0  # (draw order kept from v0 data)
            self.amount[i] = self.rng.uniform(*self.config.severity_range(self.mode[i])) \
                if self.mode[i] in DEFAULT_SEVERITY else 0.0
            if sideways:
                direction = np.array([np.cos(angle), np.sin(angle), 0.0])
                # push: line up 6 cm to the side, then sweep `amount` past the cube centre
                self.grasp_offset[i] = (self.amount[i] if self.mode[i] == "missed_grasp" else 0.06) * direction
            self.release_step[i] = self.rng.integers(2, max(3, self.config.grasp_steps - 1))

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return eef_actions("LiftExpert", self.envs, obs, lambda i, eef: self._act_one(i, eef, self._cube(i, obs)))

    def _cube(self, i: int, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Env i's cube position: privileged in a ground-truth env, else from the `object` observation (a
        learned env that predicts it)."""
        if hasattr(self.envs[i], "privileged_state"):
            return self.envs[i].privileged_state()["cube_pos"]
        if OBJECT_KEY not in obs:
            raise ValueError("the scripted expert needs privileged state or the 'object' observation "
                             "(make the env with obs_keys including 'object')")
        return LIFT_TASK.field(np.asarray(obs[OBJECT_KEY][i], dtype=np.float64), "cube_pos")

    def _act_one(self, i: int, eef: np.ndarray, cube: np.ndarray) -> np.ndarray:
        cfg, mode = self.config, self.mode[i]
        gripper = -1.0  # open unless grasping or lifting
        if self.phase[i] == APPROACH:
            target = cube + self.grasp_offset[i] + np.array([0.0, 0.0, cfg.hover_height])
            err = target - eef
            if np.linalg.norm(err[:2]) < 0.01 and abs(err[2]) < 0.02:
                self.phase[i], self.counter[i] = DESCEND, 0
        if self.phase[i] == DESCEND:
            depth = 0.0 if mode == "push" else -0.005  # push: the fingertips at the cube's centre height
            target = cube + self.grasp_offset[i] + np.array([0.0, 0.0, depth])
            err = target - eef
            if mode == "close_early" and (self.counter[i] > 0 or -err[2] <= self.amount[i]):
                # closes `amount` above the grasp point and waits for the fingers; the closed fingers then
                # descend onto the cube for a few steps, then lift
                gripper = 1.0
                self.counter[i] += 1
                if self.counter[i] <= cfg.grasp_steps:
                    target = eef.copy()
                elif self.counter[i] >= cfg.grasp_steps + 6:
                    self.phase[i], self.counter[i], self.lift_origin[i] = LIFT, 0, eef
            elif abs(err[2]) < 0.01 and np.linalg.norm(err[:2]) < 0.015:
                self.phase[i], self.counter[i] = (PUSH if mode == "push" else GRASP), 0
                # push: sweep along the line through the cube centre to `amount` past it
                self.lift_origin[i] = cube - self.grasp_offset[i] / 0.06 * self.amount[i]
        if self.phase[i] == GRASP:
            target, gripper = eef.copy(), 1.0
            self.counter[i] += 1
            if mode == "close_late":  # rise at once; the gripper closes `amount` above the grasp point
                self.phase[i], self.counter[i], self.lift_origin[i] = LIFT, 0, eef
            elif mode == "early_release" and self.counter[i] > self.release_step[i]:
                # the grasp is given up before the fingers hold the cube (the lift then fails)
                self.phase[i], self.lift_origin[i], self.counter[i] = RELEASED, eef, 0
            elif self.counter[i] >= cfg.grasp_steps:
                self.phase[i], self.counter[i] = LIFT, 0
                self.lift_origin[i] = eef
        if self.phase[i] == LIFT:
            risen = eef[2] - self.lift_origin[i][2]
            target = self.lift_origin[i] + np.array([0.0, 0.0, cfg.lift_height])
            gripper = 1.0 if mode != "close_late" or risen >= self.amount[i] else -1.0
            self.counter[i] += 1
            if mode == "release_mid_lift" and risen >= self.amount[i]:
                self.phase[i], self.lift_origin[i], self.counter[i] = RELEASED, eef, 0
        if self.phase[i] == PUSH:
            target = self.lift_origin[i].copy()
            self.counter[i] += 1
            if np.linalg.norm((target - eef)[:2]) < 0.01 or self.counter[i] > 30:
                self.phase[i], self.lift_origin[i], self.counter[i] = RELEASED, eef, 0
        if self.phase[i] == RELEASED:  # let go of the cube, wait for the fingers to open, then rise
            gripper = -1.0
            self.counter[i] += 1
            rise = cfg.lift_height if self.counter[i] > 6 else 0.0
            target = self.lift_origin[i] + np.array([0.0, 0.0, rise])
        if mode == "never_close":
            gripper = -1.0
        move = np.clip(cfg.gain * (target - eef), -1.0, 1.0)

        if mode == "hesitation":
            if self.pause_left[i] > 0:
                self.pause_left[i] -= 1
                move = 0.3 * self.wander[i]
            elif self.rng.random() < 0.08:
                self.pause_left[i] = self.rng.integers(3, 10)
                self.wander[i] = self.rng.uniform(-1, 1, 3)

        return osc_action(move, gripper, cfg.action_noise, self.rng)

    def describe(self) -> dict:
        return {"policy": "lift-expert", **asdict(self.config)}


def expert_config_from_spec(options: str, action_noise: float = 0.0) -> LiftExpertConfig:
    """The Lift expert's behaviour from the options of a policy spec `lift-expert:OPTIONS`.

    OPTIONS is a comma-separated list of `MODE` (always that failure mode), `MODE=SEVERITY` (that graded
    mode at a fixed severity in metres, e.g. `missed_grasp=0.03`) and `noise=STD`; empty = the clean expert.
    """
    probs: dict[str, float] = {}
    severity: dict[str, tuple[float, float]] = {}
    for item in filter(None, (x.strip() for x in options.split(","))):
        name, _, value = item.partition("=")
        try:
            if name == "noise":
                action_noise = float(value)
            elif name in FAILURE_MODES:
                probs[name] = 1.0
                if value:
                    severity[name] = (float(value), float(value))
            else:
                raise ValueError(f"unknown option {name!r}")
        except ValueError as e:
            raise ValueError(f"lift-expert options {options!r}: {e}; use MODE, MODE=SEVERITY or noise=STD with "
                             f"modes {FAILURE_MODES}") from None
    if len(probs) > 1:
        raise ValueError(f"lift-expert options {options!r}: name one failure mode, got {sorted(probs)}")
    return LiftExpertConfig(action_noise=action_noise, failure_probs=probs, severity=severity)
