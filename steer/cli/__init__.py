"""The ``steer`` command line: a thin layer over the public API; every subcommand writes JSON.

    steer demo [--out DIR]            the end-to-end tour on the embedded model
    steer refusal --harmful H --harmless S [--json OUT]
    steer patch --task ioi --nodes heads --method activation,atp,atp*
    steer bias [--templates FILE] [--json OUT]
    steer persona --trait NAME|FILE [--json OUT]
    steer evaluate --direction FILE --items TRAIT|FILE [--json OUT]
    steer fasb --prompts FILE [--probe FILE] [--json OUT]
    steer diagnose massive|lens|trace [--text T] [--json OUT] [--plot PNG]
    steer store --prompts FILE --out DIR [--layers all] [--site resid_post] [--shard auto]
"""

from __future__ import annotations

import argparse
import importlib
import sys

_SUBCOMMANDS = ("demo", "refusal", "patch", "bias", "persona", "evaluate", "multi", "fasb", "diagnose", "store")


def emit(doc, path=None, indent: int = 1) -> None:
    """Print ``doc`` as JSON and, if ``path`` is given, also write it there (what every subcommand does)."""
    import json
    from pathlib import Path

    text = json.dumps(doc, indent=indent, default=str)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        print(f"written to {path}", file=sys.stderr)
    print(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _SUBCOMMANDS:
        importlib.import_module(f"steer.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
