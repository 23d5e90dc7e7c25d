"""`promoe` entry point: one subcommand per module in this package."""
from __future__ import annotations

import argparse
import signal
import sys
import traceback

from ..errors import ModelError, ParameterError, one_line
from .flags import Parser, describe, setting, size


def _convert(args) -> int:
    from ..format.converter import convert
    out = convert(args.model, args.out_dir, progress=not args.quiet)
    print(f"wrote {out}")
    return 0


def _info(args) -> int:
    from . import info
    return info.run(args)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="promoe", description=__doc__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("info", help="architecture, experts, quant types, sizes, GPU memory per cache rate")
    s.add_argument("model", nargs="?", default=None,
                   help="GGUF file or converted cache directory (default: the embedded model)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="device the memory plan is for")
    s.add_argument("--n-ctx", type=setting("n_ctx"), default=None, help="KV cache length (default: the Engine's)")
    s.add_argument("--gpu-mem", type=size, default=None,
                   help="print what lives where with this much device memory (e.g. 12G)")
    s.add_argument("--trace", default=None, help="a routing trace (promoe trace): adds the expected hit rate")
    s.set_defaults(func=_info)

    s = sub.add_parser("convert", help="write the expert-major cache layout of a GGUF")
    s.add_argument("model", help="GGUF file")
    s.add_argument("out_dir", help="output directory (must not exist)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_convert)

    from . import run
    run.add_parsers(sub)
    from . import bench
    bench.add_parsers(sub)
    from . import predict_cmds
    predict_cmds.add_parsers(sub)
    from . import serve, chat
    serve.add_parsers(sub)
    chat.add_parsers(sub)
    from . import simulate
    simulate.add_parsers(sub)
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # so `finally`/cleanup paths run (e.g. convert removes its temp dir)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """`--debug` before or after the subcommand (the subcommand's copy only sets it when given)."""
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                 help="show the full traceback of an error")


def report_error(e: BaseException, debug: bool) -> int:
    """Print `promoe: error: ...` (bad input, exit 2) or `promoe: internal error: ...` (exit 1)."""
    if debug:
        traceback.print_exception(type(e), e, e.__traceback__)
    if isinstance(e, ParameterError):               # a setting: named by its flag
        print(f"promoe: error: {one_line(describe(e))}", file=sys.stderr)
        return 2
    if isinstance(e, ModelError):
        print(f"promoe: error: {one_line(e)}", file=sys.stderr)
        return 2
    if isinstance(e, OSError) and e.filename is not None:     # a path the user gave: missing, no access, full
        print(f"promoe: error: {e.filename}: {e.strerror or one_line(e)}", file=sys.stderr)
        return 2
    if isinstance(e, MemoryError):
        print("promoe: error: out of memory", file=sys.stderr)
        return 1
    hint = "" if debug else " (run with --debug for the traceback)"
    print(f"promoe: internal error: {type(e).__name__}: {one_line(e)}{hint}", file=sys.stderr)
    return 1


def main(argv=None) -> int:
    parser = build_parser()
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("promoe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:                      # `promoe run ... | head`: the reader left, not an error
        sys.stderr.close()
        return 0
    except Exception as e:  # noqa: BLE001 - every failure becomes one line and an exit status
        return report_error(e, args.debug)


if __name__ == "__main__":
    sys.exit(main())
