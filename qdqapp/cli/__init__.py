"""The ``qdq`` command: a thin layer over the Python API.

Each subcommand lives in its own module ``cmd_<name>.py`` and registers itself with
:func:`register`; :func:`build_parser` discovers the modules, so adding a command touches
no other file.
The CLI sits on top of all three packages: subcommands import ``sensitivity`` and
``export`` inside their handlers, so ``import qdq`` never pulls them in.

Errors print one line (``qdq: error: ...``) and exit 2 for bad input, 1 for a failed
check; ``--debug`` shows the traceback before that line, with the same exit status.
Progress goes to stderr through ``logging`` (``--quiet`` keeps warnings only), results to
stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable

from qdq.provenance import recording_command
from qdqapp.errors import CliError
from qdqapp.logs import OwnInfo

__all__ = ["main", "register", "CliError"]

_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable, str, str]] = {}


def register(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
             handler: Callable[[argparse.Namespace], int], epilog: str = "") -> None:
    """Add a subcommand: ``add_arguments(parser)`` declares it, ``handler(args)`` runs it."""
    _COMMANDS[name] = (add_arguments, handler, help, epilog)


def _load_commands() -> None:
    """Import every ``qdqapp/cli/cmd_*.py``; importing a module registers its command."""
    import importlib
    import pkgutil

    import qdqapp.cli as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"qdqapp.cli.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    parser = argparse.ArgumentParser(
        prog="qdq",
        description="Explicit (Q/DQ) INT8 quantization of PyTorch models for TensorRT.",
        epilog="Run 'qdq COMMAND --help' for a command's options and examples.",
    )
    from qdq import __version__

    parser.add_argument("--version", action="version", version=f"qdq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_arguments, _handler, help_text, epilog) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--quiet", action="store_true", help="print only results and errors")
        p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
        add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    console = _console_logging(args.debug, args.quiet)
    _, handler, _, _ = _COMMANDS[args.command]
    typed = ["qdq", *(sys.argv[1:] if argv is None else argv)]
    try:
        with recording_command(typed):  # reports name the command that made them
            return int(handler(args) or 0)
    except KeyboardInterrupt:
        print("qdq: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI turns every failure into one line
        if args.debug:
            traceback.print_exc()
        code = err.code if isinstance(err, CliError) else 2
        text = " ".join(str(err).split()) or type(err).__name__
        print(f"qdq: error: {text}", file=sys.stderr)
        return code
    finally:
        logging.getLogger().removeHandler(console)
        logging.captureWarnings(False)


def _console_logging(debug: bool, quiet: bool) -> logging.Handler:
    """Progress to stderr: everything with --debug, warnings only with --quiet. The root
    logger itself lets INFO through, so a log file (qdq run's run.log) gets it all."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    handler.setFormatter(logging.Formatter("%(message)s"))
    if not debug:
        handler.addFilter(OwnInfo())
    root.addHandler(handler)
    logging.captureWarnings(True)
    return handler


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
