"""What a joiner refuses to start from before launching anything: documents without a lab
section, a slot the run lacks, an unreadable bootstrap, a hardware run on a machine that is no
TDX guest; and which evidence it starts its worker with (its slot's simulated keys, or the TDX
guest's configfs-tsm)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hfl_lab import ConfigError
from hfl_lab.backends.local.joiner import JoinedWorker
from hfl_lab.config import LabConfig
from hfl_lab.trust.enrollment import RunDocuments
from tests.td_support import PLATFORM

CONFIG = yaml.safe_dump({"deployment": {}, "lab": LabConfig(workers=2).to_dict()})
BOOT = b'{"platform": "' + PLATFORM.for_slot("worker1").export_secret().hex().encode() + b'"}'


def documents(config: str = CONFIG, bootstrap: bytes = BOOT) -> RunDocuments:
    return RunDocuments(config_yaml=config, policy_yaml="tee_type: TDX\n",
                        policy_signature="ab" * 32, bootstrap=bootstrap)


@pytest.mark.parametrize(
    ("slot", "docs", "words"),
    [("worker0", documents(config="just text"), "without a 'lab' section"),
     ("worker2", documents(), "has 2 slots, not worker2"),
     ("worker0", documents(bootstrap=b"{not json"), "bootstrap this joiner cannot read"),
     ("worker0", documents(bootstrap=b'{"platform": "00"}'), "bootstrap this joiner cannot read"),
     ("worker0", documents(bootstrap=b""), "this machine is no TDX guest")],
)
def test_a_joiner_refuses_documents_it_cannot_start_from(tmp_path: Path, slot: str,
                                                         docs: RunDocuments, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        JoinedWorker(slot, docs, run_dir=tmp_path / "joiner")

    assert not (tmp_path / "joiner").exists(), "nothing written, nothing launched"


def test_a_joiner_takes_the_platform_from_the_bootstrap(tmp_path: Path) -> None:
    worker = JoinedWorker("worker1", documents(), run_dir=tmp_path / "joiner")

    assert worker.platform is not None and worker.platform.root_der == PLATFORM.root_der
    assert worker.roles == ["worker1"] and worker.index == 1
    assert "keys\"" not in repr(worker) and "<slot keys in memory>" in repr(worker)
    assert worker.evidence == "simulated"


def test_a_joiner_of_a_hardware_run_on_a_tdx_guest_quotes_with_configfs_tsm(
    tmp_path: Path
) -> None:
    tsm = tmp_path / "tsm" / "report"  # the kernel's interface, as a TDX guest has it
    tsm.mkdir(parents=True)

    worker = JoinedWorker("worker1", documents(bootstrap=b""), run_dir=tmp_path / "joiner",
                          configfs_root=tsm)

    assert worker.platform is None and worker.evidence == "configfs-tsm"
    assert "configfs-tsm" in repr(worker)

