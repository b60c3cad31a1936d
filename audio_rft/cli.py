"""`audio-rft <command>`: thin. Each command's module adds its own arguments and entry (`add_parser`),
and is imported only when that command runs, so `audio-rft score` never pays for importing torch."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from audio_rft import UserError, __version__
from audio_rft.log import setup_logging

GLOBAL_FLAGS = ("--debug", "--quiet", "--verbose")  # taken wherever they stand, before or after the command

# command -> (its module, one-line summary). "module:function" names the entry that parses the command's own
# arguments (`[--config FILE] [key=value ...]`, config.parse_command); a bare module defines add_parser.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("audio_rft.runner", "run a pipeline YAML (default: pipelines/demo.yaml): dataset in, checkpoint and report out"),
    "prepare": ("audio_rft.data.prepare:run_argv", "build a prepared dataset (synth, avqa, mmau, jsonl, csv, hf)"),
    "validate": ("audio_rft.data.prepare", "re-check a prepared dataset folder"),
    "tiny-model": ("audio_rft.model", "build an offline tiny Qwen2-Audio preset (tiny or bench)"),
    "sft": ("audio_rft.train.sft:run_argv", "supervised fine-tuning (the baseline)"),
    "grpo": ("audio_rft.train.grpo:run_argv", "GRPO reinforcement fine-tuning"),
    "pairs": ("audio_rft.train.pairs:run_argv", "preference pairs for `prefer`: sampled and rewarded, or from the choices"),
    "prefer": ("audio_rft.train.prefer:run_argv", "preference optimisation on those pairs: DPO, KTO or ORPO"),
    "infer": ("audio_rft.eval.infer:run_argv", "batched greedy inference, MMAU prediction format"),
    "score": ("audio_rft.eval.score", "score predictions with the MMAU rule"),
    "report": ("audio_rft.eval.report", "compare scored runs with confidence intervals"),
    "curves": ("audio_rft.eval.curves", "draw a training run's metrics.jsonl into curves.png"),
    "bench": ("audio_rft.bench", "performance benchmarks against R1-AQA's way"),
    "plan": ("audio_rft.plan", "estimate GPU memory for a training config"),
}


def _top_parser() -> argparse.ArgumentParser:
    epilog = "commands:\n" + "\n".join(f"  {name:<11} {summary}" for name, (_, summary) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="audio-rft",
        description="Reinforcement fine-tuning of audio language models on audio question answering.",
        epilog=epilog + "\n\n`audio-rft COMMAND --help` explains each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"audio-rft {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--quiet", action="store_true", help="log warnings and errors only (a command's output "
                        "on stdout stays)")
    parser.add_argument("--verbose", action="store_true", help="log debug messages too, from every process of a "
                        "multi-GPU run (by default only rank 0 logs)")
    parser.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("AUDIO_RFT_DEBUG"))
    # --quiet / --verbose set AUDIO_RFT_LOG_LEVEL, which the processes a run starts (launch:) inherit
    level = "debug" if "--verbose" in argv else "warning" if "--quiet" in argv else None
    argv = [a for a in argv if a not in GLOBAL_FLAGS]
    setup_logging(level)
    top = _top_parser()
    if not argv or argv[0] not in COMMANDS:
        top.parse_args(argv)  # handles --help / --version / unknown commands
        top.print_help()
        sys.exit(2)
    command = argv[0]
    module_name, _, entry = COMMANDS[command][0].partition(":")
    module = importlib.import_module(module_name)
    try:
        if entry:
            code = getattr(module, entry)(argv[1:])
        else:
            parser = argparse.ArgumentParser(prog="audio-rft", add_help=False)
            module.add_parser(parser.add_subparsers(dest="command"), command)
            args = parser.parse_args(argv)
            code = args.func(args)
    # The one line that ends a failed command is printed, not logged: like argparse's own usage errors, it
    # must show whatever the log level, and tests and scripts read it as the command's last word.
    except UserError as e:
        if debug:
            raise
        print(f"audio-rft {command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"audio-rft {command}: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(code or 0))
