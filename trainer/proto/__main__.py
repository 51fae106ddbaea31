"""`python -m trainer.proto`: regenerate the protobuf and gRPC modules from the .proto."""

from __future__ import annotations

import sys

from trainer.proto import PROTOS

if __name__ == "__main__":
    sys.exit(PROTOS.main())
