"""`hma-gym train`: the HMA dynamics model on pre-tokenised windows of a robomimic file."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from hma_gym.checkpoint import CheckpointError, load_tensors, save_module, save_tensors, weights_hash
from hma_gym.models.hma import HMA, HMA_PRESETS, IMAGE_HEADS, EmbodimentSpec, HMAConfig, make_hma
from hma_gym.world_model import WorldModel, load_dynamics, load_tokenizer
from training.data import DataConfig, Normalizer, load_episodes
from training.fidelity import eval_windows, fidelity_report, tokenize_episodes
from training.loop import LoopConfig, train_loop
from training.mixture import Source, fit_normalizers, load_sources, mixed_batch, read_mixture, sampling_weights
from training.token_cache import TokenCacheError, load_token_cache
from training.warmstart import IMAGE_IO, copy_trunk, mar_from_maskgit

INIT_MODES = ("full", "trunk")
"""What ``--init`` gives the new model, see ``DynamicsTrainConfig.init_mode``."""

TRAINABLE = ("all", "new-embodiments", "diffusion-head")
"""Which weights train, see ``DynamicsTrainConfig.trainable``."""

_HMA_FIELDS = {f.name: f for f in fields(HMAConfig)}


def hma_default(name: str):
    """A training-config field whose default is ``HMAConfig``'s (the model's defaults live there only)."""
    f = _HMA_FIELDS[name]
    if f.default_factory is not MISSING:
        return field(default_factory=f.default_factory)
    return field(default=f.default)


@dataclass
class DynamicsTrainConfig(LoopConfig, DataConfig):
    """Train the HMA world model (discrete maskgit or continuous mar head) on a robomimic file."""

    out: str = "runs/dynamics"
    """Run directory; dynamics.safetensors, dynamics.json and normalization.safetensors are written here."""
    tokenizer: str = "runs/tokenizer"
    """Directory of a trained tokenizer (train-tokenizer), or a packed checkpoint (its tokenizer)."""
    tokens: str = ""
    """A token cache from `hma-gym tokenize` made with this tokenizer: its episodes of --data and --extra-data
    are read from it instead of from the files."""
    preset: str = "small"
    """Model size preset (tiny, small, base, xl)."""
    d_model: int = 0
    """Override the preset's width (0 = preset)."""
    n_layer: int = 0
    """Override the preset's depth (0 = preset)."""
    n_head: int = 0
    """Override the preset's heads (0 = preset)."""
    patch_size: int = hma_default("patch_size")
    """Image tokens grouped p x p into one trunk token (the shipped models use 2)."""
    n_action_tokens: int = hma_default("n_action_tokens")
    """Action tokens per frame."""
    max_frames: int = hma_default("max_frames")
    """Training window T (a new model's inference context; with --init the model keeps its own, which must
    be at least this long)."""
    prompt_frames: tuple[int, ...] = (1, 4)
    """n_prompt is drawn from these per sample; later frames are predicted from clean history."""
    objective_probs: dict[str, float] = hma_default("objective_probs")
    """Masking objective mixture (JSON; the shipped models used {"forward": 0.8, "full": 0.1, "passive": 0.05,
    "policy": 0.05})."""
    embodiment: str = "panda_osc_pose"
    """Name of the data's embodiment (its stem, head and statistics)."""
    mixture: str = ""
    """A mixture JSON file (training/mixture.py): train on several datasets and embodiments at once
    instead of --data; the first dataset's held-out split is the one evaluated."""
    mixture_power: float = 0.5
    """Dataset sampling probability ~ n_windows ** power (1 = by size, 0 = uniform, < 1 favours small)."""
    init: str = ""
    """A `train` run directory or a packed checkpoint (e.g. hma_gym/assets/lift; or a `select-layers` output)
    to start from, as --init-mode says. The model's size and objective mixture then come from it (--preset,
    --patch-size, --n-action-tokens and --objective-probs are not used; --d-model, --n-layer and --n-head,
    if given, must be its own)."""
    init_mode: str = "full"
    """With --init. full: the whole model, its weights and its embodiments' statistics (fine-tuning; keeps its
    image head); embodiments of the data it lacks get a new stem and head. trunk: all but the image head of a
    maskgit model (trunk, stems, heads, statistics) under a new image head for --tokenizer: another
    tokenizer's codes, --factorized-head, or --head mar --lattice-input (whose lattice input then starts as
    the maskgit model's code embedding; training/warmstart.py)."""
    trainable: str = "all"
    """Weights that train. all; new-embodiments: only the stems and heads of the embodiments --init lacks (the
    rest frozen); diffusion-head: only a mar model's diffusion MLP (the rest keeps its --init weights)."""
    factorized_head: bool = False
    """maskgit: embed and predict each FSQ channel of a code separately (one small softmax per channel,
    sum(levels) logits a token instead of one softmax over all prod(levels) codes): keeps a large codebook
    (e.g. hma_gym/assets/tokenizer_15k's 15,360 codes) as cheap as the 1,000-code one."""
    steps: int = 6000
    """Optimizer steps."""
    batch_size: int = 8
    """Windows per step."""
    lr: float = 1e-3
    """Peak learning rate."""
    eval_windows: int = 32
    """Held-out windows for the periodic open-loop evaluation."""
    eval_every: int = 1000
    """Held-out evaluation every n steps."""
    head: str = hma_default("head")
    """maskgit: discrete tokenizer codes, cross-entropy; mar: the tokenizer's continuous latents, a per-token
    diffusion head (noise-prediction loss, DDIM sampling)."""
    diff_width: int = hma_default("diff_width")
    """mar: width of the diffusion MLP."""
    diff_depth: int = hma_default("diff_depth")
    """mar: residual blocks of the diffusion MLP."""
    diff_sample_steps: int = hma_default("diff_sample_steps")
    """mar: DDIM steps per token at generation (the checkpoint's default)."""
    diff_batch_mul: int = hma_default("diff_batch_mul")
    """mar: noise draws per masked token per step."""
    lattice_input: bool = False
    """mar: the trunk embeds the latents rounded to the tokenizer's FSQ lattice, as the codes they round to
    (exactly a maskgit trunk's inputs) instead of by one linear layer; the diffusion head still predicts
    continuous latents."""

    def __post_init__(self):
        LoopConfig.__post_init__(self)
        DataConfig.__post_init__(self)
        if self.preset not in HMA_PRESETS:
            raise ValueError(f"preset must be one of {sorted(HMA_PRESETS)}. Got {self.preset=}")
        if self.head not in IMAGE_HEADS:
            raise ValueError(f"head must be one of {IMAGE_HEADS}. Got {self.head=}")
        if self.init_mode not in INIT_MODES:
            raise ValueError(f"init_mode must be one of {INIT_MODES}. Got {self.init_mode=}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}. Got {self.trainable=}")
        if self.head == "mar" and self.tokens:
            raise ValueError("a token cache holds discrete codes; a mar model trains on latents from --data "
                             "(leave out --tokens)")
        if self.factorized_head and self.head != "maskgit":
            raise ValueError("--factorized-head is a maskgit head; leave out --head mar")
        if self.lattice_input and self.head != "mar":
            raise ValueError("--lattice-input is an input of the mar head: add --head mar")
        if self.init_mode == "trunk" and not self.init:
            raise ValueError("--init-mode trunk needs --init (the maskgit model whose trunk starts this one)")
        if self.init and self.init_mode == "full" and (self.factorized_head or self.lattice_input):
            raise ValueError("--init-mode full keeps the --init model's image head; --factorized-head and "
                             "--lattice-input make a new one: add --init-mode trunk")
        if self.init_mode == "trunk" and self.head == "mar" and not self.lattice_input:
            raise ValueError("--init-mode trunk --head mar needs --lattice-input (the mar model then embeds a "
                             "latent as the maskgit model embeds its code)")
        if self.trainable == "new-embodiments" and not (self.init and self.init_mode == "full"):
            raise ValueError("--trainable new-embodiments needs --init (with --init-mode full): the model whose "
                             "trunk, stems and heads stay frozen")
        if self.trainable == "diffusion-head" and not (self.head == "mar" and self.init):
            raise ValueError("--trainable diffusion-head trains only a mar model's diffusion MLP: it needs "
                             "--head mar and --init (the weights that stay)")
        if self.mixture and (self.tokens or self.extra_data):
            raise ValueError("--mixture lists every dataset itself; leave out --tokens and --extra-data")
        if not self.prompt_frames or min(self.prompt_frames) < 1 or max(self.prompt_frames) >= self.max_frames:
            raise ValueError(f"prompt_frames must lie in [1, max_frames - 1]. Got {self.prompt_frames=}")

    def data_config(self) -> DataConfig:
        return DataConfig(**{k: getattr(self, k) for k in DataConfig.__dataclass_fields__})


def mar_fields(cfg: DynamicsTrainConfig, levels: tuple[int, ...]) -> dict:
    """The HMAConfig fields of a mar model that the training config sets (``levels``: the tokenizer's)."""
    return dict(diff_width=cfg.diff_width, diff_depth=cfg.diff_depth, diff_sample_steps=cfg.diff_sample_steps,
                diff_batch_mul=cfg.diff_batch_mul, latent_levels=tuple(levels) if cfg.lattice_input else ())


def image_head_fields(cfg: DynamicsTrainConfig, tokenizer) -> dict:
    """The HMAConfig fields of the image head that the training config and the tokenizer set."""
    levels = tuple(tokenizer.cfg.levels)
    head = dict(vocab_size=tokenizer.codebook_size, grid=tokenizer.cfg.grid, head=cfg.head)
    if cfg.head == "mar":
        head.update(latent_dim=len(levels), **mar_fields(cfg, levels))
    elif cfg.factorized_head:
        head.update(code_levels=levels)
    return head


def build_model(cfg: DynamicsTrainConfig, tokenizer, embodiments: dict[str, EmbodimentSpec]):
    """A new model: the preset (and size overrides), the training config's fields and the tokenizer's."""
    overrides = {k: getattr(cfg, k) for k in ("d_model", "n_layer", "n_head") if getattr(cfg, k)}
    return make_hma(
        cfg.preset, **overrides, **image_head_fields(cfg, tokenizer), patch_size=cfg.patch_size,
        n_action_tokens=cfg.n_action_tokens, max_frames=cfg.max_frames, objective_probs=cfg.objective_probs,
        embodiments=embodiments,
    )


def select_files(episodes: list, cfg: DynamicsTrainConfig, cache_meta: dict) -> list:
    """The cached episodes that come from cfg.data and cfg.extra_data (a cache may hold more files)."""
    cached = cache_meta["data"]
    if cached["data"] != cfg.data:
        raise TokenCacheError(f"{cfg.tokens} was made from {cached['data']}, not --data {cfg.data}")
    missing = set(cfg.extra_data) - set(cached["extra_data"])
    if missing:
        raise TokenCacheError(f"{cfg.tokens} holds no episodes of {sorted(missing)} (it has {cached['extra_data']})")
    keep = set(cfg.extra_data)
    return [e for e in episodes if ":" not in e.name or e.name.rsplit(":", 1)[0] in keep]


def _single_source(cfg: DynamicsTrainConfig, data: DataConfig) -> tuple[Source, dict]:
    """--data (+ --extra-data, or a token cache of them) as the one dataset of the run."""
    sources = {"data": cfg.data, "extra_data": list(cfg.extra_data)}
    if cfg.tokens:
        splits, cache_meta = load_token_cache(cfg.tokens)
        if cache_meta.get("tokenizer_hash") != weights_hash(cfg.tokenizer):
            raise TokenCacheError(f"{cfg.tokens} was made by another tokenizer than {cfg.tokenizer} "
                                  f"({cache_meta.get('tokenizer')}); rerun `hma-gym tokenize`")
        train_eps, valid_eps = (select_files(splits[s], cfg, cache_meta) for s in ("train", "valid"))
        sources["tokens"] = cfg.tokens
    else:
        train_eps = load_episodes(data, "train", progress=cfg.progress)
        valid_eps = load_episodes(data, "valid", progress=cfg.progress)
    return Source(cfg.data, cfg.embodiment, cfg.action_stride, train_eps, valid_eps), sources


def _new_image_head(cfg: DynamicsTrainConfig, tokenizer, source: HMA) -> HMA:
    """--init-mode trunk: ``source``'s trunk, stems and heads under a new image head for the tokenizer."""
    if source.config.head != "maskgit":
        raise CheckpointError(f"{cfg.init} is a {source.config.head} model; --init-mode trunk starts from a "
                              "maskgit model")
    try:
        if cfg.head == "mar":  # the lattice input starts as the maskgit code embedding
            return mar_from_maskgit(source, len(tokenizer.cfg.levels), **mar_fields(cfg, tokenizer.cfg.levels))
        model = HMA(replace(source.config, **{"code_levels": (), **image_head_fields(cfg, tokenizer)}))
        copy_trunk(model, source)
    except ValueError as err:
        raise CheckpointError(f"--init {cfg.init} --init-mode trunk: {err}") from err
    return model


def _start_from_init(cfg: DynamicsTrainConfig, tokenizer, sources: list[Source], norms: dict[str, Normalizer]):
    """The --init model (as --init-mode says) with a new stem and head for each embodiment of the data it
    lacks: (model, new embodiment names, init metadata, statistics)."""
    model, meta = load_dynamics(cfg.init)
    init_meta = {"dir": cfg.init, "mode": cfg.init_mode, "trained_steps": meta.get("trained_steps")}
    if cfg.init_mode == "trunk":
        model = _new_image_head(cfg, tokenizer, model)
        init_meta["new_image_head"] = [k for k in model.state_dict() if k.startswith(IMAGE_IO)]
        seeded = " (its lattice input from the maskgit code embedding)" if cfg.head == "mar" else ""
        print(f"trunk, stems and heads from {cfg.init}; a new {cfg.head} image head{seeded}")
    elif model.config.head != cfg.head:
        raise CheckpointError(f"{cfg.init} is a {model.config.head} model, not --head {cfg.head}")
    c = model.config
    resized = [f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in ("d_model", "n_layer", "n_head")
               if getattr(cfg, k) and getattr(cfg, k) != getattr(c, k)]
    if resized:
        raise CheckpointError(f"{cfg.init} has d_model {c.d_model}, n_layer {c.n_layer}, n_head {c.n_head}; --init "
                              f"keeps its size: leave out {', '.join(resized)}")
    if (c.vocab_size, c.grid) != (tokenizer.codebook_size, tokenizer.cfg.grid):
        raise CheckpointError(f"{cfg.init} predicts {c.vocab_size} codes on a {c.grid}x{c.grid} grid, the tokenizer "
                              f"{cfg.tokenizer} has {tokenizer.codebook_size} on {tokenizer.cfg.grid}x"
                              f"{tokenizer.cfg.grid}: start a model on other codes with --init-mode trunk")
    if c.max_frames < cfg.max_frames:
        raise CheckpointError(f"{cfg.init} has a {c.max_frames}-frame context, shorter than --max-frames "
                              f"{cfg.max_frames}")
    norm_tensors = load_tensors(Path(cfg.init) / "normalization.safetensors")
    new = []
    for s in sources:
        A, S = s.train[0].actions.shape[1], s.train[0].states.shape[1]
        spec = model.config.embodiments.get(s.embodiment)
        if spec is None:
            if s.embodiment not in new:
                model.add_embodiment(s.embodiment, EmbodimentSpec(action_dim=A, state_dim=S))
                norm_tensors.update(norms[s.embodiment].tensors(prefix=f"{s.embodiment}/"))
                new.append(s.embodiment)
        elif (spec.action_dim, spec.state_dim) != (A, S):
            raise CheckpointError(f"{cfg.init}: embodiment {s.embodiment!r} has (action, state) dims "
                                  f"{(spec.action_dim, spec.state_dim)}, the data {s.data} has {(A, S)}")
        elif f"{s.embodiment}/state_mean" not in norm_tensors:
            norm_tensors.update(norms[s.embodiment].tensors(prefix=f"{s.embodiment}/"))
    init_meta["new_embodiments"] = new
    return model.train(), new, init_meta, norm_tensors


def freeze_except_trainable(cfg: DynamicsTrainConfig, model: HMA, new: list[str]) -> list | None:
    """--trainable: the parameters that train (None: all); every other one stops requiring gradients."""
    if cfg.trainable == "all":
        return None
    if cfg.trainable == "new-embodiments":
        if not new:
            raise CheckpointError(f"--trainable new-embodiments: {cfg.init} already has every embodiment of the "
                                  f"data ({', '.join(model.embodiment_names)})")
        trainable = [p for name in new for p in model.embodiments[name].parameters()]
    else:  # diffusion-head
        trainable = list(model.image.net.parameters())
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return trainable


def train_dynamics(cfg: DynamicsTrainConfig) -> dict:
    tokenizer = load_tokenizer(cfg.tokenizer)
    data = cfg.data_config()
    data.image_size = tokenizer.cfg.image_size
    if cfg.mixture:
        sources = load_sources(read_mixture(cfg.mixture), data, progress=cfg.progress)
        source_meta = {"mixture": cfg.mixture, "datasets": [
            {"data": s.data, "embodiment": s.embodiment, "action_stride": s.action_stride,
             "train_episodes": len(s.train), "valid_episodes": len(s.valid)} for s in sources]}
    else:
        single, source_meta = _single_source(cfg, data)
        sources = [single]
    norms = fit_normalizers(sources)

    torch.manual_seed(cfg.seed)
    new = []
    if cfg.init:
        # statistics of embodiments the init model already knows stay those its stems were trained with
        model, new, source_meta["init"], norm_tensors = _start_from_init(cfg, tokenizer, sources, norms)
    else:
        specs = {s.embodiment: EmbodimentSpec(action_dim=s.train[0].actions.shape[1],
                                              state_dim=s.train[0].states.shape[1]) for s in sources}
        model = build_model(cfg, tokenizer, dict(sorted(specs.items())))
        norm_tensors = {}
        for name, n in norms.items():
            norm_tensors.update(n.tensors(prefix=f"{name}/"))
    trainable = freeze_except_trainable(cfg, model, new)
    eval_src = sources[0]
    wm = WorldModel(tokenizer, model, norm_tensors, eval_src.embodiment)
    for s in sources:
        tokenize_episodes(wm, s.train + s.valid)
    windows = eval_windows(eval_src.valid, 12, 8)
    windows = [windows[i] for i in np.random.default_rng(0).permutation(len(windows))[: cfg.eval_windows]]
    ids = {name: model.embodiment_id(name) for name in model.embodiment_names}
    norm_of = {name: Normalizer.from_tensors(norm_tensors, prefix=f"{name}/") for name in norms}
    prompts = np.asarray(cfg.prompt_frames)
    probs = sampling_weights([s.n_windows for s in sources], cfg.mixture_power)
    widths = (max(e.action_dim for e in model.config.embodiments.values()),
              max(e.state_dim for e in model.config.embodiments.values()))

    def batch_fn(step: int, rng: np.random.Generator) -> dict:
        batch = mixed_batch(sources, probs, rng, cfg.batch_size, cfg.max_frames, norm_of, ids, widths)
        batch["n_prompt"] = torch.from_numpy(rng.choice(prompts, cfg.batch_size)).long()
        return batch

    def loss_fn(net, batch):
        return net(batch)

    def eval_fn(model) -> dict:
        wm.dynamics = model  # the EMA copy when --ema is on
        wm.to(next(model.parameters()).device)
        report = fidelity_report(wm, eval_src.valid, windows, n_random=1)
        return {k: v for k, v in report.items() if isinstance(v, float)}

    def export_fn(model, step: int) -> None:
        meta = {"hma": model.config.to_dict(), "embodiment": eval_src.embodiment, "trained_steps": step,
                **source_meta, "image_key": cfg.image_key, "proprio_keys": list(cfg.proprio_keys),
                "action_stride": eval_src.action_stride, "tokenizer": cfg.tokenizer}
        save_module(cfg.out, "dynamics", model, meta)
        save_tensors(Path(cfg.out) / "normalization.safetensors", norm_tensors)

    run_config = {"command": "train", **asdict(cfg), "params": model.num_params(),
                  "train_episodes": sum(len(s.train) for s in sources),
                  "valid_episodes": sum(len(s.valid) for s in sources),
                  "sampling_probs": {s.data: float(p) for s, p in zip(sources, probs, strict=True)},
                  "new_embodiments": new}
    metrics = train_loop(cfg, model, batch_fn, loss_fn, eval_fn, export_fn, run_config, trainable=trainable,
                         desc="dynamics")
    report = {"out": cfg.out, "params": model.num_params(), **metrics}
    Path(cfg.out, "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report
