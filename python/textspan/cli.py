"""The `textspan` command, assembled from the experiment modules (`textspan.experiments`)."""

from __future__ import annotations

import argparse
import sys

from .errors import TextspanError


def parser() -> argparse.ArgumentParser:
    from .experiments import COMMANDS

    p = argparse.ArgumentParser(
        prog="textspan",
        description="Explain in words what each part of a CLIP vision transformer "
        "writes into its image embedding.",
    )
    commands = p.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        sub = commands.add_parser(
            module.NAME, help=module.HELP, description=getattr(module, "DESCRIPTION", None)
        )
        module.add_arguments(sub)
        sub.set_defaults(main=module.main)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.main(args)
    except TextspanError as e:
        # What textspan refuses on purpose ends in one line that says what is wrong; anything
        # else is a bug and keeps its traceback.
        print(f"textspan {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"textspan {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
