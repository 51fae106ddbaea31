"""`python -m trainer.proto`: regenerate the protobuf and gRPC modules from the .proto."""

from __future__ import annotations

import sys

from hfl_lab._exceptions import HflLabError

from ._generate import generate


def main() -> int:
    try:
        written = generate()
    except HflLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
