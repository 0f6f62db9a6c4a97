"""Command line: ``python -m fastcache demo [options]``."""

from __future__ import annotations

import argparse
import sys

from . import demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastcache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(commands.add_parser("demo", help="plain vs fastcache on a tiny pipeline built offline"))
    args = parser.parse_args(argv)
    return demo.main(args)


if __name__ == "__main__":
    sys.exit(main())
