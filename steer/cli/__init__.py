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
import math
import sys

_SUBCOMMANDS = ("demo", "refusal", "patch", "bias", "persona", "evaluate", "multi", "fasb", "diagnose", "store")


def finite(doc):
    """``doc`` with every non-finite float (NaN, ±inf) replaced by ``None``, through nested dicts,
    lists and tuples: what JSON can hold (``null``) for a number that could not be computed.

    >>> finite({"r": float("nan"), "xs": (1.0, float("inf"))})
    {'r': None, 'xs': [1.0, None]}
    """
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: finite(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [finite(v) for v in doc]
    return doc


def dumps(doc, indent: int = 1, **kw) -> str:
    """``doc`` as strict JSON: non-finite floats written as ``null`` (never a bare ``NaN`` or
    ``Infinity``, which strict parsers reject).

    >>> dumps({"r": float("nan")}, indent=None)
    '{"r": null}'
    """
    import json

    return json.dumps(finite(doc), indent=indent, allow_nan=False, **kw)


def positive_int(text: str) -> int:
    """argparse ``type``: an integer >= 1.

    >>> positive_int("3")
    3
    """
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {n}")
    return n


def finite_float(text: str) -> float:
    """argparse ``type``: a finite number (not nan or ±inf).

    >>> finite_float("-2.5")
    -2.5
    """
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return x


def finite_floats(text: str, flag: str) -> list[float]:
    """Comma-separated finite numbers (``"-2,0,2"`` → ``[-2.0, 0.0, 2.0]``); a ValueError naming
    ``flag`` for anything else (nan and ±inf included).

    >>> finite_floats("-2, 0,2", "--strengths")
    [-2.0, 0.0, 2.0]
    """
    out = []
    for part in (x.strip() for x in text.split(",")):
        if not part:
            continue
        try:
            x = float(part)
        except ValueError:
            raise ValueError(f"{flag} {text!r}: {part!r} is not a number.") from None
        if not math.isfinite(x):
            raise ValueError(f"{flag} {text!r}: {part!r} is not a finite number.")
        out.append(x)
    return out


def neutral_requests(n: int, command: str) -> list[str]:
    """The last ``n`` of steer's held-out harmless requests (the neutral-KL prompts of ``steer
    evaluate`` and ``steer multi``); ``n`` outside 1..their number is an error naming it.

    >>> len(neutral_requests(3, "evaluate"))
    3
    """
    from steer.refusal import training_data

    harmless = training_data()["harmless"]
    if not 1 <= n <= len(harmless):
        raise SystemExit(f"steer {command}: --neutral {n}: steer has {len(harmless)} harmless requests; "
                         f"take 1..{len(harmless)}.")
    return harmless[len(harmless) - n:]


def emit(doc, path=None, indent: int = 1) -> None:
    """Print ``doc`` as JSON and, if ``path`` is given, also write it there (what every subcommand does);
    a number that could not be computed (NaN, ±inf) is written as ``null``."""
    from pathlib import Path

    text = dumps(doc, indent=indent, default=str)
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
