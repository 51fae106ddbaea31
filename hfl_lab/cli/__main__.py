"""``python -m hfl_lab.cli``: the same as the ``hfl-lab`` command."""

from hfl_lab.cli import main

raise SystemExit(main())
