"""``python -m trainer ps|worker|trust --config FILE``: one participant of a lab run."""

import sys

from trainer.entrypoint import main

sys.exit(main())
