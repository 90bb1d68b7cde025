"""The `mambaout` command line: one small module per subcommand, each with `add_arguments(parser)` and `run(args)`.

Subcommand modules parse flags, call the library and print; they hold no logic of their own. A `UserError`
(or a bad flag) becomes one `error: ...` line on stderr and exit status 2.
"""

import argparse
import importlib
import sys
import warnings
from typing import Any, NoReturn

from mambaout.cli.args import add_malloc
from mambaout.errors import UserError, one_line
from mambaout.fast.allocator import tune_cpu_allocator

# each is the module mambaout.cli.<name>; its docstring's first line is its help text
SUBCOMMANDS = (
    "models",
    "convert",
    "train",
    "eval",
    "predict",
    "plot",
    "bench",
    "export",
    "demo",
    "tokens",
    "ablate",
    "detect",
    "segment",
    "scaling",
    "erf",
    "data",
)
# the subcommands that run models, so that glibc's malloc may keep their large CPU tensors' memory for reuse
MALLOC_SUBCOMMANDS = ("train", "eval", "predict", "bench", "ablate", "scaling", "erf")
_MESSAGE_LIMIT = 2000  # characters of an error line: messages echo what the user gave, which may be huge


def _warning_line(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> str:
    """Warnings as the CLI's other messages: one `warning:` line, not Python's file:line and source echo."""
    return f"warning: {one_line(str(message), _MESSAGE_LIMIT)}\n"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the command and the flag (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {one_line(message, _MESSAGE_LIMIT)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mambaout", description="MambaOut vision backbones: models, weights, tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"mambaout.cli.{name}")
        summary = (module.__doc__ or "").strip().splitlines()[0]
        p = sub.add_parser(name, help=summary, description=module.__doc__)
        module.add_arguments(p)
        if name in MALLOC_SUBCOMMANDS:
            add_malloc(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; the exit status: 0 done, 2 a user's mistake (one `error:` line), 130 interrupted."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag argparse reported: its status, not an exception
        return int(e.code or 0)
    if getattr(args, "malloc", None) == "tuned":
        tune_cpu_allocator()
    formatwarning = warnings.formatwarning
    warnings.formatwarning = _warning_line
    try:
        return int(args.run(args) or 0)
    except UserError as e:
        print(f"error: {one_line(str(e), _MESSAGE_LIMIT)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning
