"""Command line: ``python -m fastcache demo [options]`` and ``python -m fastcache serve [options]``."""

from __future__ import annotations

import argparse
import sys

from . import demo


def main(argv: list[str] | None = None) -> int:
    from .serve.cli import add_serve_arguments

    parser = argparse.ArgumentParser(prog="python -m fastcache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_arguments(commands.add_parser("demo", help="plain vs fastcache on a tiny pipeline built offline"))
    add_serve_arguments(commands.add_parser(
        "serve", help="OpenAI-compatible image server (default: the tiny pipeline on 127.0.0.1:8000)",
        description="Serve POST /v1/images/generations, /v1/models, /health, /ready and /metrics. "
                    "Needs pip install 'fastcache-diffusers[serve]'."))
    args = parser.parse_args(argv)
    if args.command == "serve":
        from .serve.cli import main as serve_main

        return serve_main(args)
    return demo.main(args)


if __name__ == "__main__":
    sys.exit(main())
