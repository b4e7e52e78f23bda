"""`hma-gym render`: re-render the camera of a recorded file from its MuJoCo states."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import h5py
import numpy as np
from tqdm.auto import tqdm

from hma_gym.data.hdf5 import DatasetError, list_demos, validate_file
from hma_gym.envs.robosuite_env import RobosuiteEnv


@dataclass
class RenderConfig:
    """Copy a robomimic file, replacing its camera images by renders of its states at a new size."""

    data: str
    """Input HDF5 (must hold MuJoCo `states`)."""
    out: str
    """Output HDF5 (must not exist)."""
    image_size: int = 84
    """New camera image size in pixels."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self):
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8. Got {self.image_size=}")


def render(cfg: RenderConfig) -> dict:
    if os.path.exists(cfg.out):
        raise FileExistsError(f"{cfg.out} exists; choose a new --out")
    info = validate_file(cfg.data, require_states=True)
    env_args = info["env_args"]
    kwargs = env_args.get("env_kwargs", {})
    camera = (kwargs.get("camera_names") or ["agentview"])[0]
    controller = kwargs.get("controller_configs", {}).get("body_parts", {}).get("right", {}).get("type", "OSC_POSE")
    robots = kwargs.get("robots", "Panda")
    env = RobosuiteEnv(task=env_args["env_name"], robot=robots if isinstance(robots, str) else robots[0],
                       controller=controller, camera=camera, image_size=cfg.image_size,
                       control_freq=kwargs.get("control_freq", 20))
    env.reset(seed=0)
    key = f"{camera}_image"
    with h5py.File(cfg.data, "r") as src, h5py.File(cfg.out, "w") as dst:
        src.copy("mask", dst)
        data = dst.create_group("data")
        for k, v in src["data"].attrs.items():
            data.attrs[k] = v
        new_args = dict(env_args)
        new_args["env_kwargs"] = {**kwargs, "camera_heights": cfg.image_size, "camera_widths": cfg.image_size}
        data.attrs["env_args"] = json.dumps(new_args)
        for name in tqdm(list_demos(cfg.data), desc="render", disable=not cfg.progress):
            g_src = src[f"data/{name}"]
            g = data.create_group(name)
            for k, v in g_src.attrs.items():
                g.attrs[k] = v
            for k in g_src.keys():
                if k not in ("obs", "next_obs"):
                    g_src.copy(k, g)
            states, actions = g_src["states"][()], g_src["actions"][()]
            frames = [env.set_state(s)[key] for s in states]
            # the state after the last action is not recorded: step the physics from the last state
            env.set_state(states[-1])
            last, *_ = env.step(actions[-1])
            next_frames = frames[1:] + [last[key]]
            for grp, imgs in (("obs", frames), ("next_obs", next_frames)):
                out = g.create_group(grp)
                for k in g_src[grp].keys():
                    if k == key:
                        out.create_dataset(k, data=np.stack(imgs), compression="lzf")
                    else:
                        g_src[grp].copy(k, out)
    env.close()
    try:
        summary = validate_file(cfg.out)
    except DatasetError:
        raise
    print(json.dumps({"out": cfg.out, "demos": summary["demos"], "image_size": cfg.image_size}))
    return summary
