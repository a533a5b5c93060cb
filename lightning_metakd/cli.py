"""The ``metakd`` command."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("metakd: meta-knowledge distillation. Subcommands arrive with the CLI issue.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
