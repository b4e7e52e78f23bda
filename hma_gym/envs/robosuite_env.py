"""Ground-truth Gymnasium env over a robosuite task (MuJoCo physics, offscreen rendering)."""

from __future__ import annotations

import logging
import os
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from hma_gym.tasks import OBJECT_KEY, object_task

# Offscreen rendering through Mesa/EGL unless the user chose a backend; robosuite reads this at import.
os.environ.setdefault("MUJOCO_GL", "egl")

DEFAULT_PROPRIO_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
# The process in which an env of this module started Mesa (MuJoCo's offscreen renderer); a forked child
# inherits the value. Mesa's threads do not survive a fork: a child that starts a renderer of its own
# after its parent did waits forever (see RobosuiteEnv._render_context).
_RENDERER_STARTED_IN: int | None = None
FORKED_RENDERER_ERROR = (
    "this process was forked from one that had started MuJoCo's offscreen renderer (Mesa), whose threads do "
    "not survive a fork, so rendering here would hang. Start worker processes with 'spawn' or 'forkserver' "
    "(gymnasium: gym.make_vec(..., vectorization_mode='async', vector_kwargs={'context': 'spawn'})), or "
    "create the async vector env before rendering anything in the parent."
)
# robomimic's key names for robosuite observations that robosuite names otherwise
ROBOSUITE_ALIASES = {OBJECT_KEY: "object-state"}


def _quiet_robosuite() -> None:
    # robosuite logs a page of warnings per env (missing optional models, unused controller parts).
    logging.getLogger("robosuite").setLevel(logging.ERROR)
    for handler in logging.getLogger("robosuite").handlers:
        handler.setLevel(logging.ERROR)


def check_reset_options(options: Any, supported: tuple[str, ...]) -> dict:
    """`reset(options=...)`: None or a dict of supported keys; returns the dict (empty for None)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"reset options must be a dict or None, got {type(options).__name__}")
    unknown = sorted(set(options) - set(supported))
    if unknown:
        raise ValueError(f"unknown reset options {unknown}; supported: {', '.join(supported) or 'none'}")
    return options


def make_controller_config(robot: str, controller: str) -> dict:
    """robosuite 1.5 composite controller config with `controller` (e.g. OSC_POSE) driving the arm."""
    from robosuite.controllers import load_part_controller_config
    from robosuite.controllers.composite.composite_controller_factory import (
        refactor_composite_controller_config,
    )

    part = load_part_controller_config(default_controller=controller)
    return refactor_composite_controller_config(part, robot, ["right"])


class RobosuiteEnv(gym.Env):
    """A robosuite manipulation task as a Gymnasium env with robomimic observation keys.

    ## Action space
    `Box(-1, 1, (action_dim,), float32)`: the robosuite controller's normalised input. For the
    registered `RobomimicLift-v0` this is OSC_POSE: 3 position deltas, 3 axis-angle rotation deltas
    (scaled by the controller to at most 5 cm / 0.5 rad a step) and the gripper (-1 open, +1 close),
    applied at `control_freq` Hz (20). Values outside [-1, 1] are clipped; a wrong shape or a
    NaN/inf raises `ValueError` and leaves the env as it was.

    ## Observation space
    | key | shape | dtype |
    |---|---|---|
    | `agentview_image` | (image_size, image_size, 3), upright | uint8 |
    | `robot0_eef_pos` | (3,) | float32 |
    | `robot0_eef_quat` | (4,) | float32 |
    | `robot0_gripper_qpos` | (2,) | float32 |

    `obs_keys=(...)` picks the returned keys instead, among these and robomimic's `object` (robosuite's
    `object-state`; for Lift, 10 floats: cube position, cube quaternion, gripper-to-cube vector) and
    robosuite's other low-dim observations, e.g. `obs_keys=("agentview_image", "robot0_eef_pos",
    "robot0_eef_quat", "robot0_gripper_qpos", "object")`. Privileged state (object poses, the flattened
    MuJoCo state, the model XML) is available from `privileged_state()` and `model_xml()` for scripted
    experts and data recording.

    ## Rewards and episode end
    Reward 1.0 when the task's success check holds, else 0.0; `info["is_success"]`. For Lift the check
    is `hma_gym.tasks.LIFT.success` on the object state (cube centre more than 4 cm above the table),
    the function the learned env applies to its predicted object state. With
    `terminate_on_success=True` (default) the episode terminates on success; data collection turns
    that off. Truncation is left to gymnasium's `TimeLimit` (`max_episode_steps=100` for Lift).

    ## Starting state
    robosuite's placement sampler (cube position and yaw) and robot joint noise, drawn from a
    generator seeded by `reset(seed=...)`: the same seed gives the same scene and observation.
    `reset` takes no options: a MuJoCo scene cannot be rebuilt from an observation, so
    `options={"initial_observation": ...}` (the learned env's paired start) is refused; reset with a seed
    and hand its observation to the learned env, or restore a recorded MuJoCo state with `set_state`.
    After `close()`, `reset()` builds the scene again.

    The offscreen renderer starts at the first frame, not in `__init__`: an env built only to read its
    spaces (gymnasium's async vector env builds one in the parent before forking its workers) leaves
    the parent free of Mesa, whose threads a forked child cannot use.

    ## Arguments
    `task`, `robot`, `controller` (robosuite names), `camera`, `image_size`, `control_freq`,
    `terminate_on_success`, `use_camera` (False: no image key, no rendering), `obs_keys` (above),
    `fast_render` (True: no multisample anti-aliasing, shadows, reflections or skybox, ~3x cheaper
    on a CPU; the images are then slightly more aliased), `render_mode` ("rgb_array"), `scene_seed`
    (seeds what robosuite draws once per instance, such as Lift's cube size, so that every instance
    builds the same scene; default 0).

    ## Version history
    * v0: initial release (robosuite 1.5.2, mujoco 3.3.7).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        task: str = "Lift",
        robot: str = "Panda",
        controller: str = "OSC_POSE",
        camera: str = "agentview",
        image_size: int = 64,
        control_freq: int = 20,
        terminate_on_success: bool = True,
        use_camera: bool = True,
        fast_render: bool = True,
        proprio_keys: tuple[str, ...] = DEFAULT_PROPRIO_KEYS,
        obs_keys: tuple[str, ...] | None = None,
        render_mode: str | None = None,
        scene_seed: int = 0,
    ):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or 'rgb_array'. Got {render_mode=}")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8. Got {image_size=}")
        if control_freq <= 0:
            raise ValueError(f"control_freq must be positive. Got {control_freq=}")
        if render_mode == "rgb_array" and not use_camera:
            raise ValueError("render_mode='rgb_array' needs use_camera=True")

        self.task, self.robot, self.controller = task, robot, controller
        self.camera, self.image_size, self.control_freq = camera, int(image_size), int(control_freq)
        self.terminate_on_success = terminate_on_success
        self.use_camera, self.fast_render = use_camera, fast_render
        self.proprio_keys = tuple(proprio_keys)
        self.obs_keys = None if obs_keys is None else tuple(obs_keys)
        self.render_mode = render_mode
        self.metadata = {**self.metadata, "render_fps": self.control_freq}

        self.env_kwargs = dict(
            robots=robot,
            controller_configs=make_controller_config(robot, controller),
            has_renderer=False,
            has_offscreen_renderer=use_camera,
            use_camera_obs=False,  # rendered here, so several envs can share a process (see _render)
            use_object_obs=True,
            reward_shaping=False,
            control_freq=self.control_freq,
            horizon=10**9,
            ignore_done=True,
            hard_reset=False,  # keeps the fast render context; placements are still re-sampled
            # robosuite draws some scene properties once, at construction (Lift's cube size), from its own
            # generator: a fixed seed makes every instance build the same scene, so `reset(seed=s)` agrees
            # across instances and processes (the per-episode randomness is reseeded in `reset`)
            seed=int(scene_seed),
        )
        self._rs = self._open()

        self.action_space = spaces.Box(-1.0, 1.0, shape=(self._rs.action_dim,), dtype=np.float32)
        obs = self._rs.reset()
        image_key = f"{camera}_image"
        wanted = (image_key, *self.proprio_keys) if use_camera else self.proprio_keys
        if self.obs_keys is not None:
            wanted = self.obs_keys
            if len(set(wanted)) != len(wanted):
                raise ValueError(f"obs_keys has duplicates. Got {obs_keys=}")
            if image_key in wanted and not use_camera:
                raise ValueError(f"obs_key {image_key!r} needs use_camera=True")
        obs_spaces: dict[str, spaces.Space] = {}
        self._low_dim_keys: list[tuple[str, str]] = []  # (our key, robosuite's key)
        for key in wanted:
            if key == image_key:
                obs_spaces[key] = spaces.Box(0, 255, shape=(self.image_size, self.image_size, 3), dtype=np.uint8)
                continue
            rs_key = ROBOSUITE_ALIASES.get(key, key)
            if rs_key not in obs or key.endswith("_image"):
                known = sorted({image_key, OBJECT_KEY, *(k for k in obs if not k.endswith("_image"))})
                raise ValueError(f"robosuite {task}/{robot} has no observation {key!r}; known: {known}")
            obs_spaces[key] = spaces.Box(-np.inf, np.inf, shape=np.shape(obs[rs_key]), dtype=np.float32)
            self._low_dim_keys.append((key, rs_key))
        self._image_key = image_key if image_key in obs_spaces else None
        self._object_task = object_task(task)
        self.observation_space = spaces.Dict(obs_spaces)
        self._last_obs: dict[str, np.ndarray] | None = None
        self._needs_reset = True

    def _open(self):
        """The robosuite env, without its offscreen renderer: `_render_context` starts that at the first frame."""
        _quiet_robosuite()
        import robosuite as suite

        return suite.make(self.task, **{**self.env_kwargs, "has_offscreen_renderer": False})

    # ------------------------------------------------------------------ rendering
    def _render_context(self):
        """The offscreen render context, started on first use (robosuite would start it in `suite.make`)."""
        global _RENDERER_STARTED_IN
        if self._rs is None:
            raise RuntimeError("render() called on a closed env; reset() opens it again")
        ctx = self._rs.sim._render_context_offscreen
        if ctx is not None:
            return ctx
        if _RENDERER_STARTED_IN not in (None, os.getpid()):
            raise RuntimeError(FORKED_RENDERER_ERROR)
        import mujoco
        from robosuite.utils.binding_utils import MjRenderContextOffscreen

        sim = self._rs.sim
        if self.fast_render:
            sim.model._model.vis.quality.offsamples = 0  # no MSAA buffer
        ctx = MjRenderContextOffscreen(sim, device_id=self._rs.render_gpu_device_id)  # registers itself in sim
        ctx.vopt.geomgroup[0] = int(self._rs.render_collision_mesh)  # as robosuite's _reset_internal sets them
        ctx.vopt.geomgroup[1] = int(self._rs.render_visual_mesh)
        if self.fast_render:
            for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                         mujoco.mjtRndFlag.mjRND_SKYBOX):
                ctx.scn.flags[flag] = 0
        _RENDERER_STARTED_IN = os.getpid()
        return ctx

    def _render(self, size: int | None = None) -> np.ndarray:
        size = size or self.image_size
        ctx = self._render_context()
        # robosuite never makes its GL context current again after creating it; with several envs in
        # one process the last one created would otherwise receive every draw call.
        ctx.gl_ctx.make_current()
        img = self._rs.sim.render(camera_name=self.camera, width=size, height=size)
        return np.ascontiguousarray(img[::-1])  # OpenGL rows run bottom-up: flip to upright

    def _make_obs(self, rs_obs: dict[str, Any]) -> dict[str, np.ndarray]:
        obs: dict[str, np.ndarray] = {}
        if self._image_key is not None:
            obs[self._image_key] = self._render()
        for key, rs_key in self._low_dim_keys:
            obs[key] = np.asarray(rs_obs[rs_key], dtype=np.float32)
        self._object_state = rs_obs.get("object-state")
        return obs

    def _success(self) -> bool:
        """The task's verdict: its shared object-state predicate (`hma_gym.tasks`) where it has one."""
        if self._object_task is not None and self._object_state is not None:
            return bool(self._object_task.success(np.asarray(self._object_state)))
        return bool(self._rs._check_success())

    # ------------------------------------------------------------------ seeding
    def _seed_robosuite(self) -> None:
        """Give robosuite a generator drawn from `self.np_random`.

        robosuite makes its generator once at construction and each placement sampler keeps its own
        reference to it, so both must be replaced for a seeded reset to move the objects.
        """
        rng = np.random.default_rng(int(self.np_random.integers(2**63 - 1)))
        self._rs.rng = rng
        stack = [getattr(self._rs, "placement_initializer", None)]
        while stack:
            sampler = stack.pop()
            if sampler is None:
                continue
            if hasattr(sampler, "rng"):
                sampler.rng = rng
            stack.extend(getattr(sampler, "samplers", {}).values())

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if isinstance(options, dict) and "initial_observation" in options:
            raise ValueError(
                "the ground-truth env cannot start from a given observation (options['initial_observation']): a "
                "MuJoCo scene is not determined by its image and proprio. Reset it with a seed and pass its "
                "observation to the learned env, or restore a recorded MuJoCo state with set_state()"
            )
        check_reset_options(options, ())
        super().reset(seed=seed)
        if self._rs is None:  # closed: build the scene again
            self._rs = self._open()
        self._seed_robosuite()
        rs_obs = self._rs.reset()
        self._last_obs = self._make_obs(rs_obs)
        self._needs_reset = False
        return self._copy_obs(), {"is_success": self._success()}

    def step(self, action):
        if self._rs is None:
            raise RuntimeError("step() called on a closed env; reset() opens it again")
        if self._needs_reset:
            raise RuntimeError("step() called before reset()")
        action = self.validate_action(action, self.action_space.shape[0])
        rs_obs, _, _, _ = self._rs.step(action.astype(np.float64))
        self._last_obs = self._make_obs(rs_obs)
        success = self._success()
        reward = 1.0 if success else 0.0
        terminated = success and self.terminate_on_success
        return self._copy_obs(), reward, terminated, False, {"is_success": success}

    @staticmethod
    def validate_action(action, action_dim: int) -> np.ndarray:
        """Check shape and finiteness of one action and clip it to [-1, 1]."""
        arr = np.asarray(action, dtype=np.float32)
        if arr.shape != (action_dim,):
            raise ValueError(f"action must have shape ({action_dim},), got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"action must be finite (no NaN/inf), got {arr.tolist()}")
        return np.clip(arr, -1.0, 1.0)

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        if self._last_obs is None:
            raise RuntimeError("render() called before reset()")
        if self._image_key is None:
            return self._render()
        return self._last_obs[self._image_key].copy()

    def close(self):
        if getattr(self, "_rs", None) is not None:
            self._rs.close()
            self._rs = None
        self._needs_reset = True

    def _copy_obs(self) -> dict[str, np.ndarray]:
        assert self._last_obs is not None
        return {k: v.copy() for k, v in self._last_obs.items()}

    # ------------------------------------------------------------------ privileged access
    @property
    def robosuite_env(self):
        """The wrapped robosuite env (privileged: for experts, recording and debugging)."""
        return self._rs

    def privileged_state(self) -> dict[str, np.ndarray]:
        """Object poses and the flattened MuJoCo state; not part of the observation."""
        rs = self._rs
        out = {"mujoco_state": self.mujoco_state()}
        obs = rs._get_observations(force_update=True)
        for key in ("object-state",):
            if key in obs:
                out["object"] = np.asarray(obs[key], dtype=np.float64)
        for name, value in obs.items():
            if name.endswith("_pos") or name.endswith("_quat"):
                if not name.startswith("robot"):
                    out[name] = np.asarray(value, dtype=np.float64)
        out["eef_pos"] = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        if hasattr(rs, "table_offset"):
            out["table_height"] = np.asarray([rs.table_offset[2]], dtype=np.float64)
        return out

    def mujoco_state(self) -> np.ndarray:
        """The flattened MuJoCo state (time, qpos, qvel), as robomimic records it in `states`."""
        return np.asarray(self._rs.sim.get_state().flatten(), dtype=np.float64)

    def model_xml(self) -> str:
        """The MuJoCo model XML (robomimic stores it per demo as `model_file`)."""
        return self._rs.sim.model.get_xml()

    def set_state(self, mujoco_state: np.ndarray) -> dict[str, np.ndarray]:
        """Restore a flattened MuJoCo state (e.g. from an HDF5 `states` row) and return its observation."""
        self._rs.sim.set_state_from_flattened(np.asarray(mujoco_state, dtype=np.float64))
        self._rs.sim.forward()
        self._last_obs = self._make_obs(self._rs._get_observations(force_update=True))
        self._needs_reset = False
        return self._copy_obs()

    def env_args(self) -> dict:
        """robomimic's `env_args` for files recorded from this env (JSON-able)."""
        kwargs = {k: v for k, v in self.env_kwargs.items() if k != "controller_configs"}
        kwargs.update(
            controller_configs=self.env_kwargs["controller_configs"],
            camera_names=[self.camera],
            camera_heights=self.image_size,
            camera_widths=self.image_size,
            use_camera_obs=self.use_camera,
        )
        import robosuite  # env_version: robomimic warns when a file does not name it

        return {"env_name": self.task, "type": 1, "env_version": robosuite.__version__, "env_kwargs": kwargs}
