"""Lab events: the one stream the backends emit and the dashboard, audit log and tests consume."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

#: event kinds and the keys their ``data`` carries
KINDS = {
    # verifier, subject, accepted (bool), reason, simulated (bool), measurements {name: hex},
    # checks [{name, passed, expected, actual, reason}]
    "attestation",
    # role ("worker0" | "ps0"), step, loss, accuracy, lr, compute_s, push_s, wait_s, pull_s,
    # bytes_sent, bytes_received
    "metrics",
    # step, loss, accuracy, num_samples: evaluation of the global model on the test set
    "evaluation",
    # participant lifecycle: state ("starting" | "ready" | "exited" | "failed"), pid, detail
    "lifecycle",
    # a decision of the trust service (issuance, key release, admin call): action, allowed, reason
    "audit",
    # a log line of a participant: level, message
    "log",
    # progress of a long step: done, total, unit, label
    "progress",
}


#: the ``label`` of a progress event that names the lab's own start-up step in its ``stage``
#: ("creating the model's LUKS volume"): what the run does before, or between, participants
STARTUP = "start-up"


def startup_event(stage: str) -> LabEvent:
    """A progress event naming the start-up step the lab (the owner's side) is at."""
    return LabEvent("progress", "lab", {"done": 0, "total": 0, "unit": "", "label": STARTUP,
                                        "stage": stage})


@dataclass(frozen=True)
class LabEvent:
    """Something that happened in a run, from one source, at one time."""

    kind: str
    source: str
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(
            {"kind": self.kind, "source": self.source, "time": self.time, "data": self.data}
        )

    @classmethod
    def from_json(cls, text: str) -> LabEvent:
        d = json.loads(text)
        return cls(kind=d["kind"], source=d["source"], data=d.get("data", {}), time=d["time"])
