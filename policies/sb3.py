"""stable-baselines3 models behind the batched policy protocol, loaded without unpickling.

An SB3 zip (`model.save`) holds `policy.pth`, the policy's state dict, and `data`, a JSON file whose
non-JSON values (the policy class, the spaces, schedules, any class in `policy_kwargs`) are cloudpickled:
SB3's own `ALGO.load` unpickles them, so a crafted zip runs code. Here the policy is rebuilt from the
env's spaces and the algorithm instead: the policy class and `policy_kwargs` are read from the plain-JSON
parts of `data` (pickled values are never decoded, only their readable descriptions are matched against a
list of SB3's own classes), and the weights come from `policy.pth` through `torch.load(weights_only=True)`.
What cannot be rebuilt that way (another algorithm, a custom policy class or extractor, a
`policy_kwargs` value that is an arbitrary object) is refused, unless the caller opts in with
`trust_pickle=True` (CLI `--trust-pickle`), which uses SB3's own loader.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# algorithms whose policies are rebuilt from the spaces + policy_kwargs + policy.pth alone
SAFE_ALGOS = ("PPO", "A2C", "SAC", "TD3", "DDPG")
ON_POLICY = ("PPO", "A2C")  # these pass use_sde to the policy beside policy_kwargs
TRUST_HINT = ("pass trust_pickle=True (CLI: --trust-pickle) to load it with SB3's own loader, which unpickles "
              "the file and so runs any code in it: only for files you made or trust")


class SB3Policy:
    """Wrap a stable-baselines3 model or policy (anything with `predict` and `action_space`) as a batched policy.

    SB3 models take the env's observation dict with a leading env dimension already, so the wrapper
    only fixes dtypes and clips to the action bounds. `deterministic=True` by default (evaluation).
    """

    def __init__(self, model, deterministic: bool = True):
        self.model, self.deterministic = model, deterministic

    @classmethod
    def load(cls, spec: str, env=None, deterministic: bool = True, device: str = "cpu",
             trust_pickle: bool = False) -> SB3Policy:
        """`ALGO:PATH`, e.g. `PPO:runs/ppo_lift.zip` (a zip saved by SB3's `model.save`).

        The policy is rebuilt for `env`'s spaces (a `gym.Env` or a vector env) from the zip's state dict;
        `trust_pickle=True` uses SB3's `ALGO.load` instead (no env needed, but it runs code from the file).
        """
        import stable_baselines3

        algo, _, path = spec.partition(":")
        algo = algo.upper()
        if not path or not algo.isidentifier() or not hasattr(stable_baselines3, algo):
            raise ValueError(f"SB3 policies are given as ALGO:PATH (e.g. PPO:model.zip). Got {spec!r}")
        if trust_pickle:
            return cls(getattr(stable_baselines3, algo).load(path, device=device), deterministic)
        if algo not in SAFE_ALGOS:
            raise ValueError(f"{path}: {algo} models cannot be loaded without unpickling (only "
                             f"{', '.join(SAFE_ALGOS)} can); {TRUST_HINT}")
        if env is None:
            raise ValueError(f"{path}: an SB3 policy is rebuilt from the env's observation and action spaces; "
                             "pass the env (load_policy(spec, env))")
        obs_space = getattr(env, "single_observation_space", env.observation_space)
        action_space = getattr(env, "single_action_space", env.action_space)
        return cls(load_sb3_policy(path, algo, obs_space, action_space, device=device), deterministic)

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        actions, _ = self.model.predict(obs, deterministic=self.deterministic)
        actions = np.asarray(actions, dtype=np.float32)
        space = self.model.action_space
        return np.clip(actions, space.low, space.high)

    def reset(self, env_ids: Sequence[int] | None = None) -> None:
        pass


def load_sb3_policy(path: str | Path, algo: str, observation_space, action_space, device: str = "cpu"):
    """The SB3 policy (`stable_baselines3.common.policies.BasePolicy`) of an `ALGO.save` zip, for these spaces.

    Never unpickles: `data` is read as JSON and `policy.pth` with `torch.load(weights_only=True)`.
    Raises ValueError naming the file when the zip is not an SB3 save of `algo`, when it needs unpickling
    to rebuild, or when its weights do not fit the spaces.
    """
    import stable_baselines3
    import torch

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no SB3 model file at {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            missing = [n for n in ("data", "policy.pth") if n not in names]
            if missing:
                raise ValueError(f"{path} is not an SB3 model zip: it has no {' or '.join(missing)}")
            raw_data, raw_weights = archive.read("data"), archive.read("policy.pth")
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not an SB3 model zip ({e})") from None
    try:
        data = json.loads(raw_data)  # pickled values stay base64 strings: never decoded
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: its `data` entry is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: its `data` entry is not a JSON object")

    algo_cls = getattr(stable_baselines3, algo)
    policy_cls = _policy_class(algo_cls, data, path)
    kwargs = _policy_kwargs(data.get("policy_kwargs", {}), path)
    if algo in ON_POLICY:
        kwargs["use_sde"] = bool(data.get("use_sde", False))
    obs_space = sb3_observation_space(observation_space)
    _check_spaces(data, obs_space, action_space, path)
    try:
        policy = policy_cls(obs_space, action_space, lambda _: 0.0, **kwargs)
    except (TypeError, ValueError, AssertionError, AttributeError) as e:
        raise ValueError(f"{path}: cannot rebuild its {policy_cls.__name__} from policy_kwargs {kwargs}: {e}") from None
    try:
        state = torch.load(io.BytesIO(raw_weights), map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises UnpicklingError, RuntimeError, ... on a bad file)
        raise ValueError(f"{path}: its policy.pth is not a plain tensor state dict, refused without unpickling "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {TRUST_HINT}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: its policy.pth is not a state dict of tensors")
    try:
        policy.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: its weights do not fit a {policy_cls.__name__} for this env's spaces "
                         f"(observation {obs_space}, action {action_space}): {e}") from None
    policy = policy.to(device)
    policy.set_training_mode(False)
    return policy


def sb3_observation_space(space):
    """The observation space SB3 trained on for an env with `space`: channel-last images transposed to
    channel-first, as `VecTransposeImage` does when an algorithm wraps the env."""
    from gymnasium import spaces
    from stable_baselines3.common.preprocessing import is_image_space, is_image_space_channels_first
    from stable_baselines3.common.vec_env import VecTransposeImage

    def needs_transpose(s) -> bool:
        return is_image_space(s) and not is_image_space_channels_first(s)

    if isinstance(space, spaces.Dict):
        if not any(needs_transpose(s) for s in space.spaces.values()):
            return space
        return spaces.Dict({k: VecTransposeImage.transpose_space(s, k) if is_image_space(s) else s
                            for k, s in space.spaces.items()})
    return VecTransposeImage.transpose_space(space) if needs_transpose(space) else space


def _policy_class(algo_cls, data: dict, path: Path):
    """One of the algorithm's own policy classes, matched by the readable description SB3 writes beside the
    pickled class (its `__module__` and `__init__`); anything else is refused."""
    saved = data.get("policy_class")
    module = saved.get("__module__") if isinstance(saved, dict) else None
    init = saved.get("__init__") if isinstance(saved, dict) else None
    for cls in dict.fromkeys(algo_cls.policy_aliases.values()):
        if module == cls.__module__ and str(init).startswith(f"<function {cls.__qualname__}.__init__ "):
            return cls
    names = ", ".join(algo_cls.policy_aliases)
    raise ValueError(f"{path}: its policy class is not one of {algo_cls.__name__}'s own ({names}), so it cannot "
                     f"be rebuilt without unpickling; {TRUST_HINT}")


# classes a pickled policy_kwargs may name (by their repr) that are rebuilt from SB3 / torch themselves
_CLASS_REPR = re.compile(r"<class '([\w.]+)\.(\w+)'>")
_KWARG_CLASSES = {"activation_fn": ("torch.nn.modules.activation",),
                  "features_extractor_class": ("stable_baselines3.common.torch_layers",)}
_EXTRACTORS = ("FlattenExtractor", "NatureCNN", "CombinedExtractor")
_IGNORED_KWARGS = ("optimizer_class", "optimizer_kwargs", "device")  # training-only, or set by the loader


def _policy_kwargs(saved, path: Path) -> dict:
    """`policy_kwargs` from `data`: a plain JSON object as is; a pickled dict from the readable values SB3
    writes beside it, with known classes (torch activations, SB3 extractors) rebuilt from their repr."""
    import torch

    if not isinstance(saved, dict):
        raise ValueError(f"{path}: policy_kwargs is {saved!r}, not a dict")
    pickled = ":serialized:" in saved
    if pickled and saved.get(":type:") != "<class 'dict'>":
        raise ValueError(f"{path}: policy_kwargs is a pickled {saved.get(':type:')}, not a dict; {TRUST_HINT}")
    kwargs = {}
    for key, value in saved.items():
        if key.startswith(":") or key in _IGNORED_KWARGS:
            continue
        if pickled and isinstance(value, str):  # the str() of an object that JSON could not hold
            match = _CLASS_REPR.fullmatch(value)
            module, name = match.groups() if match else (None, None)
            if key == "activation_fn" and module in _KWARG_CLASSES[key] and isinstance(
                    getattr(torch.nn, name, None), type) and issubclass(getattr(torch.nn, name), torch.nn.Module):
                value = getattr(torch.nn, name)
            elif key == "features_extractor_class" and module in _KWARG_CLASSES[key] and name in _EXTRACTORS:
                from stable_baselines3.common import torch_layers

                value = getattr(torch_layers, name)
            else:
                raise ValueError(f"{path}: policy_kwargs[{key!r}] is a pickled object ({value[:80]}) that cannot be "
                                 f"rebuilt without unpickling (known: torch activations as activation_fn, "
                                 f"{', '.join(_EXTRACTORS)} as features_extractor_class); {TRUST_HINT}")
        kwargs[key] = value
    net_arch = kwargs.get("net_arch")
    if isinstance(net_arch, list) and net_arch and isinstance(net_arch[0], dict):
        kwargs["net_arch"] = net_arch[0]  # SB3 < 1.8 format, converted as SB3's own load does
    return kwargs


_BOX_REPR = re.compile(r"'([^']+)': Box\([^()]*\(([\d, ]*)\)")


def _check_spaces(data: dict, obs_space, action_space, path: Path) -> None:
    """Compare the env's spaces with the shapes SB3 wrote, readable, beside the pickled spaces; a mismatch
    names both. Shapes only, and only where they can be read: the state dict load checks the rest."""
    from gymnasium import spaces

    def saved_shape(entry) -> tuple | None:
        shape = entry.get("_shape") if isinstance(entry, dict) else None
        return tuple(shape) if isinstance(shape, list) else None

    want = saved_shape(data.get("action_space"))
    if want is not None and want != tuple(action_space.shape):
        raise ValueError(f"{path} was trained with actions of shape {want}; this env's are {action_space.shape}")
    saved_obs = data.get("observation_space") if isinstance(data.get("observation_space"), dict) else {}
    if isinstance(saved_obs.get("spaces"), str) != isinstance(obs_space, spaces.Dict):
        kind = "a dict of" if isinstance(saved_obs.get("spaces"), str) else "a single array of"
        raise ValueError(f"{path} was trained on {kind} observations; this env gives {obs_space}")
    if isinstance(obs_space, spaces.Dict):
        saved = {k: tuple(int(d) for d in s.replace(" ", "").split(",") if d)
                 for k, s in _BOX_REPR.findall(saved_obs.get("spaces", ""))}
        have = {k: tuple(s.shape) for k, s in obs_space.spaces.items() if isinstance(s, spaces.Box)}
        if saved and saved != have:
            raise ValueError(f"{path} was trained on observations {saved}; this env gives {have} (keys and shapes, "
                             "images channel-first as SB3 sees them)")
    else:
        want = saved_shape(saved_obs)
        if want is not None and want != tuple(obs_space.shape):
            raise ValueError(f"{path} was trained on observations of shape {want}; this env gives {obs_space.shape}")
