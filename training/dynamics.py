"""`hma-gym train`: the HMA dynamics model on pre-tokenised windows of a robomimic file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from hma_gym.checkpoint import CheckpointError, load_tensors, save_module, save_tensors, weights_hash
from hma_gym.models.hma import HMA_PRESETS, EmbodimentSpec, make_hma
from hma_gym.world_model import WorldModel, load_dynamics, load_tokenizer
from training.data import DataConfig, Normalizer, load_episodes
from training.evaluate import eval_windows, fidelity_report, tokenize_episodes
from training.loop import LoopConfig, train_loop
from training.mixture import Source, fit_normalizers, load_sources, mixed_batch, read_mixture, sampling_weights
from training.tokens import TokenCacheError, load_token_cache
from training.warmstart import copy_trunk, keep_layers, mar_from_maskgit


@dataclass
class DynamicsTrainConfig(LoopConfig, DataConfig):
    """Train the HMA world model (discrete MaskGIT or continuous MAR variant) on a robomimic file."""

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
    patch_size: int = 2
    """Image tokens grouped p x p into one trunk token."""
    n_action_tokens: int = 4
    """Action tokens per frame."""
    max_frames: int = 12
    """Training window T (the inference context)."""
    prompt_frames: tuple[int, ...] = (1, 4)
    """n_prompt is drawn from these per sample; later frames are predicted from clean history."""
    objective_probs: dict[str, float] = field(
        default_factory=lambda: {"forward": 0.8, "full": 0.1, "passive": 0.05, "policy": 0.05})
    """Masking objective mixture (JSON)."""
    embodiment: str = "panda_osc_pose"
    """Name of the data's embodiment (its stem, head and statistics)."""
    mixture: str = ""
    """A mixture JSON file (training/mixture.py): train on several datasets and embodiments at once
    instead of --data; the first dataset's held-out split is the one evaluated."""
    mixture_power: float = 0.5
    """Dataset sampling probability ~ n_windows ** power (1 = by size, 0 = uniform, < 1 favours small)."""
    init: str = ""
    """A `train` run directory, or a packed checkpoint (e.g. hma_gym/assets/lift), to start from
    (fine-tuning): its architecture, weights and embodiments' statistics; embodiments of the data it lacks
    get a new stem and head. Size flags are ignored."""
    train_only_new: bool = False
    """With --init: train only the stems and heads of embodiments the init model lacks (trunk frozen)."""
    init_layers: tuple[int, ...] = ()
    """With --init: keep only these transformer blocks of the init model, in this order (e.g. 0 3: a
    2-layer model from a 4-layer one's first and last blocks, to fine-tune a faster model); empty = all."""
    factorized_head: bool = False
    """maskgit: embed and predict each FSQ channel of a code separately (one small softmax per channel,
    sum(levels) logits a token instead of one softmax over all prod(levels) codes): keeps a large codebook
    (e.g. hma_gym/assets/tokenizer_15k's 15,360 codes) as cheap as the 1,000-code one."""
    init_trunk: str = ""
    """A maskgit `train` run or packed checkpoint whose trunk, stems, heads and statistics start this model;
    only the image input and output start fresh (e.g. a model on another tokenizer's codes). Give the
    source's size flags (--d-model, --n-layer, --n-head, --patch-size)."""
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
    head: str = "maskgit"
    """maskgit: discrete tokenizer codes, cross-entropy; mar: the tokenizer's continuous latents (soft
    tokens), a per-token diffusion head (noise-prediction loss, DDIM sampling)."""
    diff_width: int = 256
    """mar: width of the diffusion MLP."""
    diff_depth: int = 3
    """mar: residual blocks of the diffusion MLP."""
    diff_sample_steps: int = 10
    """mar: DDIM steps per token at generation (the checkpoint's default)."""
    diff_batch_mul: int = 4
    """mar: noise draws per masked token per step."""
    lattice_input: bool = False
    """mar: the trunk embeds the latents rounded to the tokenizer's FSQ lattice, as the codes they round to
    (exactly a MaskGIT trunk's inputs; with --init-maskgit the table is that model's code embedding)
    instead of by one linear layer; the diffusion head still predicts continuous latents."""
    init_maskgit: str = ""
    """mar with --lattice-input: start from a trained MaskGIT `train` run: its trunk, stems, heads and
    statistics, and its code embedding as the lattice input's table; the diffusion head starts fresh
    (training/warmstart.py). Size flags are ignored."""
    freeze_trunk: bool = False
    """mar: train only the diffusion head; everything else keeps its initial (e.g. --init-maskgit) weights."""

    def __post_init__(self):
        LoopConfig.__post_init__(self)
        DataConfig.__post_init__(self)
        if self.preset not in HMA_PRESETS:
            raise ValueError(f"preset must be one of {sorted(HMA_PRESETS)}. Got {self.preset=}")
        if self.head == "mar" and self.tokens:
            raise ValueError("a token cache holds discrete codes; a mar model trains on latents from --data "
                             "(leave out --tokens)")
        if (self.init_maskgit or self.freeze_trunk) and self.head != "mar":
            raise ValueError("--init-maskgit and --freeze-trunk train a mar model: add --head mar")
        if self.init_maskgit and not self.lattice_input:
            raise ValueError("--init-maskgit needs --lattice-input (the mar model then embeds a latent as the "
                             "maskgit model embeds its code)")
        if sum(map(bool, (self.init, self.init_maskgit, self.init_trunk))) > 1:
            raise ValueError("give one of --init, --init-maskgit and --init-trunk")
        if (self.factorized_head or self.init_trunk) and self.head != "maskgit":
            raise ValueError("--factorized-head and --init-trunk are for the maskgit head")
        if self.factorized_head and self.init:
            raise ValueError("--init keeps the init model's head; --factorized-head builds a new model "
                             "(use --init-trunk to start its trunk from a trained one)")
        if self.train_only_new and not self.init:
            raise ValueError("--train-only-new needs --init (the model whose trunk stays frozen)")
        if self.init_layers and not self.init:
            raise ValueError("--init-layers needs --init (the model whose blocks are kept)")
        if self.init_layers and self.train_only_new:
            raise ValueError("--init-layers changes the trunk; --train-only-new keeps it frozen: give one")
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


def build_model(cfg: DynamicsTrainConfig, vocab_size: int, grid: int, embodiments: dict[str, EmbodimentSpec],
                levels: tuple[int, ...] = (8, 5, 5, 5)):
    overrides = {k: getattr(cfg, k) for k in ("d_model", "n_layer", "n_head") if getattr(cfg, k)}
    if cfg.head == "mar":
        overrides.update(head="mar", latent_dim=len(levels), **mar_fields(cfg, levels))
    elif cfg.factorized_head:
        overrides.update(code_levels=tuple(levels))
    return make_hma(
        cfg.preset, **overrides, vocab_size=vocab_size, grid=grid, patch_size=cfg.patch_size,
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


def _init_model(cfg: DynamicsTrainConfig, sources: list[Source], norms: dict[str, Normalizer]):
    """The --init model with a new stem/head for each new embodiment: (model, new names, init meta, statistics)."""
    model, meta = load_dynamics(cfg.init)
    if cfg.init_layers:
        model = keep_layers(model, cfg.init_layers)
    model.train()
    if model.config.head != cfg.head:
        raise CheckpointError(f"{cfg.init} is a {model.config.head} model, not --head {cfg.head}")
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
    return model, new, meta, norm_tensors


def _warm_start_mar(cfg: DynamicsTrainConfig, tokenizer, sources: list[Source]):
    """A mar model from the --init-maskgit run (see training/warmstart.py): (model, statistics, metadata)."""
    maskgit, meta = load_dynamics(cfg.init_maskgit)
    if maskgit.config.soft:
        raise CheckpointError(f"{cfg.init_maskgit} is a mar model; --init-maskgit takes a maskgit run")
    if maskgit.config.vocab_size != tokenizer.codebook_size:
        raise CheckpointError(f"{cfg.init_maskgit} has {maskgit.config.vocab_size} codes, the tokenizer "
                              f"{cfg.tokenizer} {tokenizer.codebook_size}: it was trained with another tokenizer")
    unknown = sorted({s.embodiment for s in sources} - set(maskgit.config.embodiments))
    if unknown:
        raise CheckpointError(f"{cfg.init_maskgit} has no stem for {unknown} (it has {maskgit.embodiment_names})")
    model = mar_from_maskgit(maskgit, len(tokenizer.cfg.levels), **mar_fields(cfg, tokenizer.cfg.levels))
    norm_tensors = load_tensors(Path(cfg.init_maskgit) / "normalization.safetensors")
    return model.train(), norm_tensors, {"dir": cfg.init_maskgit, "trained_steps": meta.get("trained_steps")}


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
    trainable, new = None, []
    if cfg.init:
        # statistics of embodiments the init model already knows stay those its stems were trained with
        model, new, init_meta, norm_tensors = _init_model(cfg, sources, norms)
        source_meta["init"] = {"dir": cfg.init, "trained_steps": init_meta.get("trained_steps"),
                               "new_embodiments": new, "layers": list(cfg.init_layers)}
        if cfg.train_only_new:
            if not new:
                raise ValueError(f"--train-only-new: every embodiment of the data is already in {cfg.init}")
            trainable = [p for name in new for p in model.embodiments[name].parameters()]
            keep = {id(p) for p in trainable}
            for p in model.parameters():
                p.requires_grad_(id(p) in keep)
    elif cfg.init_maskgit:
        model, norm_tensors, source_meta["init_maskgit"] = _warm_start_mar(cfg, tokenizer, sources)
    else:
        specs = {s.embodiment: EmbodimentSpec(action_dim=s.train[0].actions.shape[1],
                                              state_dim=s.train[0].states.shape[1]) for s in sources}
        model = build_model(cfg, tokenizer.codebook_size, tokenizer.cfg.grid, dict(sorted(specs.items())),
                            levels=tokenizer.cfg.levels)
        norm_tensors = {}
        for name, n in norms.items():
            norm_tensors.update(n.tensors(prefix=f"{name}/"))
        if cfg.init_trunk:  # the stems keep the statistics they were trained with
            source, init_meta = load_dynamics(cfg.init_trunk)
            copied = copy_trunk(model, source)
            init_norms = load_tensors(Path(cfg.init_trunk) / "normalization.safetensors")
            norm_tensors.update({k: v for k, v in init_norms.items() if k.split("/", 1)[0] in specs})
            source_meta["init_trunk"] = {"dir": cfg.init_trunk, "trained_steps": init_meta.get("trained_steps"),
                                         "copied": len(copied["copied"]), "left_out": copied["left_out"]}
            print(f"trunk from {cfg.init_trunk}: {len(copied['copied'])} tensors copied; new: "
                  f"{', '.join(copied['left_out'])}")
    if cfg.freeze_trunk:
        trainable = list(model.image.net.parameters())  # the diffusion MLP
        keep = {id(p) for p in trainable}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
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
