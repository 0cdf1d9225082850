"""The ``ddpm`` command line: ``main`` parses, runs one command and turns library errors into one line.

* :mod:`.parser` (and :mod:`.parser_sampling`) - every subcommand, its options and help texts;
* :mod:`.commands`, :mod:`.sampling`, :mod:`.study` - what each subcommand does: read the
  arguments, call the library, print;
* :mod:`.options` - how the command line names each option of the library: an error about one
  (:class:`~ddpmlab.errors.OptionError`) is named here, where ``main`` catches it.

Every rule about runs and sampling lives in :mod:`ddpmlab.runs`, not here.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image

from ddpmlab.cli.commands import option_hint
from ddpmlab.cli.options import NAMES
from ddpmlab.cli.parser import build_parser
from ddpmlab.errors import DDPMError, OptionError
from ddpmlab.training.allocator import keep_freed_memory


def _format_warning(message, category, filename, lineno, line=None, _default=warnings.formatwarning) -> str:
    """ddpmlab's own warnings (skipped images, damaged checkpoints) as plain 'warning: ...' lines."""
    if f"{Path(__file__).parent.parent}" in str(filename):  # the ddpmlab package
        return f"warning: {message}\n"
    return _default(message, category, filename, lineno, line)


def _parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]):
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before or after options: collect the ones argparse left
    overrides_only = all("=" in e and not e.startswith("-") for e in extra)
    if extra and getattr(args, "overrides", None) is not None and overrides_only:
        args.overrides = list(args.overrides) + extra
    elif extra:
        sub = getattr(args, "parser", parser)
        words = list(sys.argv[1:] if argv is None else argv)
        hint = option_hint([w for w in words if w in extra or not w.startswith("-")], extra) \
            if args.command == "train" else ""
        sub.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    warnings.formatwarning = _format_warning
    # Pillow only warns of a picture between 1x and 2x its decompression-bomb limit: open_image then refuses it
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    if args.command not in ("train", "train-autoencoder"):  # these decide by train.keep_freed_memory and the device
        keep_freed_memory()  # CPU sampling and evaluation reuse freed memory (ddpmlab.training.allocator)
    try:
        return args.func(args)
    except DDPMError as e:
        message = e.named(NAMES) if isinstance(e, OptionError) else str(e)
        print(f"ddpm {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
