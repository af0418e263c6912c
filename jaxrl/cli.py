"""`jaxrl` command line: one entry point, one module per sub-command under jaxrl/commands/.

Each command module defines `add_arguments(parser)` and `run(args) -> int`; this file only routes.
A `JaxrlError` anywhere becomes one clear line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from jaxrl.errors import JaxrlError

# name -> (module, one-line help)
COMMANDS = {
    "sft": ("jaxrl.commands.train", "step 1: supervised fine-tuning"),
    "reward": ("jaxrl.commands.train", "step 2: reward-model training (pairwise loss)"),
    "ppo": ("jaxrl.commands.train", "step 3: PPO RLHF through the Hybrid Engine"),
    "dpo": ("jaxrl.commands.train", "offline preference training: DPO, cDPO, IPO, hinge, SimPO"),
    "rl": ("jaxrl.commands.train", "step 3 with the config's `algorithm` (ppo, grpo, dr_grpo, dapo, gspo, rloo, ...)"),
    "grpo": ("jaxrl.commands.train", "step 3 with GRPO (algorithm=grpo unless the config names another)"),
    "pipeline": ("jaxrl.commands.pipeline", "all three steps, each feeding the next"),
    "generate": ("jaxrl.commands.generate", "generate text from an HF directory"),
    "chat": ("jaxrl.commands.chat", "interactive chat with an HF directory"),
    "eval-reward": ("jaxrl.commands.eval_reward", "score a preference dataset with a reward model"),
    "plan": ("jaxrl.commands.plan", "per-device memory of a config's steps, before any run"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; sub-command modules are imported only for `command` (so `jaxrl --help` is instant)."""
    parser = argparse.ArgumentParser(prog="jaxrl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may sit anywhere, also after options: `--config a.yaml x=1 --output o y=2`.
    if extra and hasattr(args, "overrides") and not any(a.startswith("-") or "=" not in a for a in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except JaxrlError as e:
        print(f"jaxrl {args.command}: error: {e}", file=sys.stderr)
        return 1


def entry() -> None:
    """The `jaxrl` console script: CPU runs first re-execute with huge pages (jaxrl/host_memory.py)."""
    from jaxrl.host_memory import reexec_with_huge_pages

    reexec_with_huge_pages()
    sys.exit(main())


if __name__ == "__main__":
    entry()
