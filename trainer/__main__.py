"""``python -m trainer ps|worker|trust --config FILE``: one participant of a lab run."""

import sys

from trainer.run import main

sys.exit(main())
