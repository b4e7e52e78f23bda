"""`hma-gym` command line: one subcommand per job, each built from a typed config dataclass.

Commands live in `training`, `policies` and `benchmarks` too; they are imported only when asked for,
so `hma_gym` itself never depends on them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hma_gym.checkpoint import CheckpointError
from hma_gym.config import add_dataclass_args, dataclass_from_args
from hma_gym.data.hdf5 import DatasetError

# errors that are about the user's input, not a bug: one line, no traceback. FloatingPointError covers the
# trainers' NonFiniteError; OSError a file that is missing, unreadable or locked.
USER_ERRORS = (DatasetError, CheckpointError, FloatingPointError, OSError)

# name -> (module, config class, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "demo": ("policies.demo", "DemoConfig", "demo",
             "the main job: paired GT-vs-learned episodes of a policy, both success rates and speeds, a video"),
    "collect": ("training.collect", "CollectConfig", "collect",
                "roll the scripted expert in the GT env into a robomimic HDF5 file"),
    "render": ("training.render", "RenderConfig", "render",
               "re-render a file's recorded MuJoCo states at another image size"),
    "train-detector": ("training.train_detector", "DetectorTrainConfig", "train_detector",
                       "train the success detector on ground-truth success labels"),
    "train-tokenizer": ("training.train_tokenizer", "TokenizerTrainConfig", "train_tokenizer",
                        "train the FSQ image tokenizer on a file's frames"),
    "tokenize": ("training.token_cache", "TokenizeConfig", "tokenize",
                 "pre-tokenise robomimic files into a small cache for `train --tokens` (e.g. on another machine)"),
    "train": ("training.train_dynamics", "DynamicsTrainConfig", "train_dynamics",
              "train the HMA world model on a robomimic file (needs a trained tokenizer)"),
    "select-layers": ("training.select_layers", "SelectLayersConfig", "select_layers",
                      "a shallower world model from chosen blocks of a trained one, for `train --init`"),
    "train-state": ("training.train_state", "StateTrainConfig", "train_state",
                    "the world model's proprio + object-state dynamics, whose predicted state gives the verdicts"),
    "pack": ("training.pack", "PackConfig", "pack",
             "assemble a checkpoint directory (tokenizer, dynamics, detector, statistics, initial observations)"),
    "synthesize": ("training.synthesize", "SynthesizeConfig", "synthesize",
                   "generate a synthetic robomimic file with the learned simulator (replayed actions or a policy)"),
    "evaluate": ("policies.evaluate", "EvaluateConfig", "evaluate",
                 "success rate (95 percent interval), length and speed of a policy in a GT or learned env"),
    "play": ("hma_gym.play", "PlayConfig", "play",
             "replay an action log in the learned env beside the GT env, as an mp4"),
    "serve": ("hma_gym.serve", "ServeConfig", "serve",
              "drive the learned env live in the browser from the keyboard, GT beside it (local web app)"),
    "calibrate-success": ("training.calibrate", "CalibrateConfig", "calibrate_success",
                          "choose the learned env's success rule (threshold, frames in a row) on held-out episodes"),
    "eval-model": ("training.fidelity", "EvalModelConfig", "eval_model",
                   "open-loop fidelity, dPSNR, perplexity and success agreement of a checkpoint"),
    "train-policy": ("training.train_policy", "PolicyTrainConfig", "train_policy",
                     "train a Diffusion Policy on robomimic HDF5 data"),
}


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hma-gym", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, cls_name, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == load:
            add_dataclass_args(p, getattr(importlib.import_module(module), cls_name))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. From the command line (`argv` None), an error in what the user gave (a malformed or
    missing data file or checkpoint, training that went non-finite) prints one line and returns 1; called
    with `argv` (tests, scripts), it raises."""
    if argv is None:
        try:
            return main(sys.argv[1:])
        except USER_ERRORS as e:
            command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
            print(f"hma-gym {command}: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 1
    argv = list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(load=command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module_name, cls_name, fn_name, _ = COMMANDS[args.command]
    module = importlib.import_module(module_name)
    try:
        cfg = dataclass_from_args(getattr(module, cls_name), args)
    except ValueError as e:
        parser.error(str(e))
    getattr(module, fn_name)(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
