"""`alignd`: run the service (api, worker, up, db, keys) and talk to it (jobs, prompt-sets)."""

from __future__ import annotations

import argparse
import sys

from alignd import client_commands, server_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignd", description="Alignment as a service.")
    sub = parser.add_subparsers(dest="command", required=True)
    server_commands.register(sub)
    client_commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except client_commands.ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
