"""The simulated TD: real-layout TDX quotes over measurements of what this process runs."""

from __future__ import annotations

import dataclasses

from hfl_lab._exceptions import ConfigError
from hfl_lab.tee.evidence import Evidence, pad_report_data
from hfl_lab.tee.reports import TdReport10
from hfl_lab.tee.sim.measure import TdMeasurements, sha384
from hfl_lab.tee.sim.platform import TCB_STATUS_SVN, SimulatedPlatform

SEPT_VE_DISABLE = 1 << 28
DEBUG = 1 << 0
DEFAULT_XFAM = bytes.fromhex("e702060000000000")
SIM_MR_SEAM = sha384(b"hfl-lab simulated TDX module")


class SimulatedTdProvider:
    """Evidence from a simulated TD. Labelled simulated everywhere; never secure.

    ``debug`` and ``tcb_status`` exist so that tests and the attack notebook can produce
    evidence that a correct verifier must refuse.
    """

    name = "simulated-td"
    simulated = True

    def __init__(
        self,
        platform: SimulatedPlatform,
        measurements: TdMeasurements,
        *,
        debug: bool = False,
        tcb_status: str = "UpToDate",
    ) -> None:
        if tcb_status not in TCB_STATUS_SVN:
            raise ConfigError(
                f"unknown TCB status '{tcb_status}'; choose one of {', '.join(TCB_STATUS_SVN)}"
            )
        self.platform = platform
        self.measurements = measurements
        self.debug = debug
        self.tcb_status = tcb_status

    def td_report(self, report_data: bytes) -> TdReport10:
        m = self.measurements
        attributes = SEPT_VE_DISABLE | (DEBUG if self.debug else 0)
        return TdReport10(
            tee_tcb_svn=bytes([TCB_STATUS_SVN[self.tcb_status]]) + bytes(15),
            mr_seam=SIM_MR_SEAM,
            mr_signer_seam=bytes(48),
            seam_attributes=bytes(8),
            td_attributes=attributes.to_bytes(8, "little"),
            xfam=DEFAULT_XFAM,
            mr_td=m.mr_td,
            mr_config_id=m.mr_config_id,
            mr_owner=bytes(48),
            mr_owner_config=bytes(48),
            rtmr0=m.rtmrs[0],
            rtmr1=m.rtmrs[1],
            rtmr2=m.rtmrs[2],
            rtmr3=m.rtmrs[3],
            report_data=pad_report_data(report_data),
        )

    def get_evidence(self, report_data: bytes) -> Evidence:
        quote = self.platform.sign_quote(self.td_report(report_data))
        return Evidence(
            quote=quote,
            provider=self.name,
            simulated=True,
            collateral_json=self.platform.collateral_json,
            event_log=tuple(dataclasses.asdict(e) for e in self.measurements.events),
        )
