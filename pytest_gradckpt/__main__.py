"""``python -m pytest_gradckpt COMMAND``.

Commands:
    bisect PACKAGE OLD NEW [-- PYTEST_ARGS...]    find the release that broke (or fixed) a verdict
    matrix [--lines T/X/P,...] [-- PYTEST_ARGS...] the packaged suite under torch/transformers/peft lines
    strategies                                    list the registered strategies
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "bisect":
        from pytest_gradckpt.release.bisect import main as bisect

        return bisect(rest)
    if command == "matrix":
        from pytest_gradckpt.release.matrix import main as matrix

        return matrix(rest)
    if command == "strategies":
        from pytest_gradckpt.strategies import registered_strategies

        for name, strategy in registered_strategies().items():
            print(f"{name:18} {strategy.description}")
        return 0
    print(f"unknown command {command!r}; run 'python -m pytest_gradckpt --help'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
