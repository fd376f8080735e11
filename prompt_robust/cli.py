"""The ``prompt-robust`` command line.

The CLI prints its results; the library itself never prints.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    print(
        "prompt-robust demo: not yet available. The embedded benchmark world and the shipped mini-CLIP it runs on "
        "are being built; until then see README.md for the Python API."
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prompt-robust", description="Make CLIP prompt learners robust to distribution shift."
    )
    parser.add_argument("--version", action="version", version=f"prompt_robust {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log progress details.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="Run the main comparison on the embedded default world.")
    demo.add_argument("--out", default="prompt_robust_demo", help="Output directory.")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
