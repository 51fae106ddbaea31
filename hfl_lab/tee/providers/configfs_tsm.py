"""TDX evidence from the Linux configfs-tsm interface (/sys/kernel/config/tsm/report)."""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hfl_lab._exceptions import AttestationError
from hfl_lab.tee.evidence import Evidence, pad_report_data

DEFAULT_ROOT = Path("/sys/kernel/config/tsm/report")
T = TypeVar("T")


class ConfigfsTsmProvider:
    """Kernel ≥ 6.7 TSM reports: mkdir an entry, write ``inblob``, read ``outblob``.

    The kernel regenerates the report when ``inblob`` changes and bumps ``generation``; a
    generation that moved by more than one between our write and our read means another
    writer raced us, so the quote may not carry our REPORTDATA and we try again.
    """

    name = "configfs-tsm"
    simulated = False

    def __init__(
        self,
        root: Path = DEFAULT_ROOT,
        *,
        retries: int = 5,
        busy_wait_s: float = 0.05,
        attribute_wait_s: float = 2.0,
    ) -> None:
        self.root = Path(root)
        self.retries = retries
        self.busy_wait_s = busy_wait_s
        self.attribute_wait_s = attribute_wait_s

    @classmethod
    def available(cls, root: Path = DEFAULT_ROOT) -> bool:
        return root.is_dir() and os.access(root, os.W_OK)

    def get_evidence(self, report_data: bytes) -> Evidence:
        inblob = pad_report_data(report_data)
        last_problem = "no attempt made"
        for _attempt in range(self.retries):
            entry = self.root / f"hfl-lab-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            try:
                os.mkdir(entry)
            except OSError as e:
                raise AttestationError(
                    f"cannot create a report entry under {self.root}: {e.strerror}",
                    check="evidence",
                    fix="run inside a TDX guest with configfs-tsm (kernel ≥ 6.7) and write access",
                ) from None
            try:
                outcome = self._generate(entry, inblob)
            finally:
                self._remove(entry)
            if isinstance(outcome, bytes):
                return Evidence(quote=outcome, provider=self.name, simulated=False)
            last_problem = outcome
        raise AttestationError(
            f"configfs-tsm gave no consistent report after {self.retries} tries: {last_problem}",
            check="evidence",
            fix="another process is generating reports concurrently; retry later",
        )

    def _generate(self, entry: Path, inblob: bytes) -> bytes | str:
        self._wait_for_attributes(entry)
        provider = (entry / "provider").read_text().strip() if (entry / "provider").exists() else ""
        if provider and not provider.startswith("tdx"):
            raise AttestationError(
                f"configfs-tsm provider is '{provider}', not TDX", check="tee_type",
                expected="tdx_guest", actual=provider,
            )
        before = self._generation(entry)
        self._retry_busy(lambda: self._write(entry / "inblob", inblob))
        quote = self._retry_busy(lambda: (entry / "outblob").read_bytes())
        after = self._generation(entry)
        if after != before + 1:
            return f"generation went {before} → {after} (another writer changed inblob)"
        if not quote:
            return "outblob was empty"
        return quote

    def _wait_for_attributes(self, entry: Path) -> None:
        # configfs creates the attributes together with the directory; waiting briefly also
        # lets the interface be exercised on an ordinary directory served by an emulator.
        deadline = time.monotonic() + self.attribute_wait_s
        while not (entry / "inblob").exists():
            if time.monotonic() > deadline:
                raise AttestationError(
                    f"{entry} has no 'inblob' attribute: {self.root} is not a configfs-tsm tree",
                    check="evidence",
                )
            time.sleep(0.001)

    @staticmethod
    def _generation(entry: Path) -> int:
        try:
            return int((entry / "generation").read_text().strip() or "0")
        except (OSError, ValueError):
            return 0

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.EIO, "short write to inblob")
        finally:
            os.close(fd)

    def _retry_busy(self, op: Callable[[], T]) -> T:
        delay = self.busy_wait_s
        for _ in range(self.retries * 4):
            try:
                return op()
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise AttestationError(
                        f"configfs-tsm I/O failed: {e.strerror or e}", check="evidence"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        raise AttestationError(
            "configfs-tsm stayed busy (EBUSY)", check="evidence", fix="retry in a moment"
        )

    @staticmethod
    def _remove(entry: Path) -> None:
        try:
            os.rmdir(entry)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                return
            # An ordinary directory (not configfs): its attributes are real files.
            for child in entry.iterdir():
                with contextlib.suppress(OSError):
                    child.unlink()
            with contextlib.suppress(OSError):
                os.rmdir(entry)
