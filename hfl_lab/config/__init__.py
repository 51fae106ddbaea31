"""LabConfig: the one typed, validated parameter set of notebooks, CLI and YAML files.

Papermill does not validate parameters, so this package does. Every value is checked on
construction (also by :meth:`LabConfig.replace`); a bad one raises :class:`ConfigError` naming the
parameter, what was expected and what was given.

Typing rule: the constructor takes Python values of the declared type and never parses strings.
An ``int`` is accepted where a ``float`` is expected, a list where a tuple is, a ``Path`` where a
path string is; ``"4"`` for ``workers`` is an error (it may be a quoting mistake or a value meant
for another parameter). Text is parsed only where it is text by nature: ``-p name=value`` pairs
(:meth:`LabConfig.from_cli`, YAML scalar rules, raw text for string parameters) and YAML files.

Modules: :mod:`.parameters` declares every parameter (type, default, doc, allowed values) and
the profiles; :mod:`.checks` checks single names and values; :mod:`.lab_config` is
:class:`LabConfig` (combinations, construction, YAML, derived values); :mod:`.notebooks` checks a
notebook's parameters cell.
"""

from hfl_lab.config.lab_config import LabConfig, LearningRateSchedule
from hfl_lab.config.parameters import DEFAULT_STEPS as DEFAULT_STEPS
from hfl_lab.config.parameters import DEPTHS as DEPTHS
from hfl_lab.config.parameters import PARAMETER_NAMES, PROFILES, Parameter, default_data_path
from hfl_lab.config.parameters import REFERENCE_BOUNDARY_EPOCHS as REFERENCE_BOUNDARY_EPOCHS
from hfl_lab.config.parameters import REFERENCE_DECAY_RATES as REFERENCE_DECAY_RATES
from hfl_lab.config.parameters_cell import validate_notebook_parameters

__all__ = [
    "PARAMETER_NAMES",
    "PROFILES",
    "LabConfig",
    "LearningRateSchedule",
    "Parameter",
    "default_data_path",
    "validate_notebook_parameters",
]
