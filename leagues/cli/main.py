"""The `leagues` command: `leagues <verb> [--recipe NAME | --config run.yaml] [--dotted.key value ...]`.

Where it sits: the top of the package; it may import everything. Each verb is a row in `VERBS`: its
config class and the function that runs it.

Decisions:
- A verb's config starts from its default recipe (if any) or the config class's defaults, from
  `--recipe NAME`, or from `--config run.yaml` (a resolved config written by `--dump-config`); dotted
  overrides are applied in order, then the verb's `resolve` (values derived from other knobs). `--print-config`
  prints the resolved YAML and stops, writing nothing.
- Every argument argparse does not know is an override, so config fields need no argparse wiring;
  `--help` lists them, with their docs, from the config class.
- Bad user input (unknown key, bad value, missing model) prints one `leagues: error: ...` line on
  stderr and exits 2, without a traceback; verbs not built yet also exit 2, naming what they await.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from leagues import __version__
from leagues.cli import UsageError
from leagues.cli.convert import ConvertConfig, run_convert
from leagues.cli.eval import EvalVerbConfig, run_eval
from leagues.cli.generate import GenerateConfig, run_generate
from leagues.cli.report import ReportConfig, run_report
from leagues.cli.router import RouterConfig, run_router
from leagues.cli.serve import ServeConfig, run_serve
from leagues.cli.sft import run_sft_verb
from leagues.cli.train import run_train_verb
from leagues.config import apply_overrides, describe, dump_yaml, from_dict, load_yaml, to_dict
from leagues.loop import TrainConfig, resolve
from leagues.recipes import RECIPES, get_recipe
from leagues.train.sft import SFTConfig


@dataclass(frozen=True, slots=True)
class Verb:
    summary: str
    config_cls: type
    run: Callable[[Any], int]
    default_recipe: str | None = None
    resolve: Callable[[Any], Any] | None = None
    """The verb's own settling of a config after every override (values derived from other knobs, checks across
    components): what `--print-config` and `--dump-config` show is what runs."""


VERBS: dict[str, Verb] = {
    "train": Verb(
        summary="RL post-training (GRPO and friends)", config_cls=TrainConfig, run=run_train_verb, resolve=resolve
    ),
    "sft": Verb(summary="supervised fine-tuning on prompt/response JSONL", config_cls=SFTConfig, run=run_sft_verb),
    "serve": Verb(summary="serve a model over HTTP (SGLang and OpenAI APIs)", config_cls=ServeConfig, run=run_serve),
    "generate": Verb(summary="print a continuation of a prompt", config_cls=GenerateConfig, run=run_generate),
    "router": Verb(summary="route requests over engine replicas", config_cls=RouterConfig, run=run_router),
    "eval": Verb(summary="accuracy of a model on a task or prompt file", config_cls=EvalVerbConfig, run=run_eval),
    "report": Verb(summary="plots and a summary of a run's metrics", config_cls=ReportConfig, run=run_report),
    "convert": Verb(summary="rewrite a checkpoint in HF format", config_cls=ConvertConfig, run=run_convert),
    "run": Verb(
        summary="the main job (`make run`): GRPO on the built-in arithmetic task with the tiny MoE",
        config_cls=TrainConfig,
        run=run_train_verb,
        default_recipe="tiny-arithmetic",
        resolve=resolve,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leagues",
        description="RL post-training for Mixture-of-Experts language models.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"leagues {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name, verb in VERBS.items():
        verb_parser = sub.add_parser(
            name,
            usage=f"leagues {name} [-h] [--recipe NAME | --config YAML] [--print-config] [--dump-config PATH] "
            "[--KEY VALUE ...]",
            help=verb.summary + ("" if verb.run else " (not built yet)"),
            description=_description(name, verb),
            epilog=_fields_help(verb.config_cls) if verb.config_cls else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
        )
        _add_common_options(verb_parser)
    return parser


def _description(name: str, verb: Verb) -> str:
    default = f" Default recipe: {verb.default_recipe}." if verb.default_recipe else ""
    recipes = [n for n in sorted(RECIPES) if _fits(verb.config_cls, n)]
    return f"{verb.summary}.{default} Recipes: {', '.join(recipes) or 'none yet'}."


def _fits(cls: type, recipe: str) -> bool:
    try:
        from_dict(cls, get_recipe(recipe))
    except ValueError:
        return False
    return True


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", metavar="NAME", help="start from a named run in leagues.recipes")
    parser.add_argument("--config", metavar="YAML", help="start from a resolved config written by --dump-config")
    parser.add_argument("--dump-config", metavar="PATH", help="write the resolved config as YAML, then run")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and stop")


def _fields_help(cls: type) -> str:
    lines = [f"config fields ({cls.__name__}); set with --key value or --key=value, bools with --key / --no-key:"]
    for info in describe(cls):
        lines.append(f"  --{info.key} {info.type_name} = {info.default}")
        if info.doc:
            lines.append(textwrap.fill(info.doc, width=100, initial_indent=" " * 8, subsequent_indent=" " * 8))
    return "\n".join(lines)


def resolve_config(name: str, verb: Verb, args: argparse.Namespace, overrides: list[str]) -> Any:
    """The verb's config: recipe, YAML file or defaults, then the dotted overrides, then the verb's `resolve`."""
    if args.recipe and args.config:
        raise ValueError("use either --recipe or --config, not both")
    recipe = args.recipe or (None if args.config else verb.default_recipe)
    if recipe:
        cfg = from_dict(verb.config_cls, get_recipe(recipe), where=f"recipe {recipe!r} for `leagues {name}`: ")
    elif args.config:
        cfg = load_yaml(verb.config_cls, args.config)
    else:
        cfg = verb.config_cls()
    cfg = apply_overrides(cfg, overrides)
    return verb.resolve(cfg) if verb.resolve is not None else cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `leagues` console script; returns the exit status."""
    args, overrides = build_parser().parse_known_args(argv)
    verb = VERBS[args.verb]
    try:  # every ValueError here is bad user input: a key, a value, a recipe or a config file
        cfg = resolve_config(args.verb, verb, args, overrides)
        if args.dump_config:
            dump_yaml(cfg, args.dump_config)
    except ValueError as e:
        return _fail(e)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
        return 0
    try:
        return verb.run(cfg)
    except (UsageError, FileNotFoundError) as e:
        return _fail(e)


def _fail(error: Exception) -> int:
    print(f"leagues: error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
