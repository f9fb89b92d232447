"""The ``idempo`` command. For now it only reports its version; ``demo``, ``proxy`` and ``keys`` come next."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``idempo`` command line; returns the exit status."""
    import idempo

    parser = argparse.ArgumentParser(prog="idempo", description="Idempotency-Key for ASGI services.")
    parser.add_argument("--version", action="version", version=f"idempo {idempo.__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
