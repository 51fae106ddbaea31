"""The one way the image pipeline runs its tools: checked, timed, recorded; secrets by in-memory fd.

Every external command of the pipeline (umoci, skopeo, gpg, docker-registry) goes through a
:class:`ToolRunner`, which records what ran, how long it took and the digest of what it made
(:class:`ToolRecord`), for notebook 03's report and ``image/pipeline.json``. A missing tool is an
``ImageError`` naming ``make system-deps``. A private key reaches a tool only through an
in-memory file descriptor (:func:`secret_fd`: the tool reads ``/dev/fd/N``), never through a
file, an argument or the environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hfl_lab._exceptions import HflLabError, ImageError

__all__ = [
    "PIPELINE_TOOLS",
    "SYSTEM_DEPS_FIX",
    "ToolRecord",
    "ToolRunner",
    "missing_tools",
    "require_tools",
    "secret_fd",
]

#: the Debian packages the image pipeline runs, by the command each installs
PIPELINE_TOOLS = {
    "umoci": "umoci",
    "skopeo": "skopeo",
    "docker-registry": "docker-registry",
    "gpg": "gnupg",
    "gpgconf": "gnupg",
}
SYSTEM_DEPS_FIX = (
    "run `make system-deps` (as root it installs skopeo, umoci, docker-registry and gnupg from "
    "Debian's packages; otherwise it prints the apt-get line)"
)
# A PEM key is a few hundred bytes; anything this large is not one.
_SECRET_LIMIT = 64 * 1024


@dataclass(frozen=True)
class ToolRecord:
    """One command of the pipeline: its step, argv, wall time, what it made (a digest)."""

    step: str
    argv: tuple[str, ...]
    seconds: float
    digest: str = ""
    returncode: int = 0

    @property
    def command_line(self) -> str:
        return shlex.join(self.argv)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "command": self.command_line, "seconds": round(self.seconds, 3),
                "digest": self.digest, "returncode": self.returncode}


def missing_tools(names: Sequence[str] = tuple(PIPELINE_TOOLS)) -> list[str]:
    """The commands of ``names`` that are not on PATH."""
    return [name for name in names if shutil.which(name) is None]


def require_tools(*names: str) -> None:
    """``ImageError`` naming every missing command and ``make system-deps``."""
    missing = missing_tools(names or tuple(PIPELINE_TOOLS))
    if missing:
        packages = sorted({PIPELINE_TOOLS.get(name, name) for name in missing})
        raise ImageError(
            f"the image pipeline needs {', '.join(missing)}, not installed here "
            f"(Debian packages: {' '.join(packages)}).",
            fix=SYSTEM_DEPS_FIX,
        )


@contextlib.contextmanager
def secret_fd(data: bytes) -> Iterator[int]:
    """A file descriptor holding ``data`` in memory only (a sealed ``memfd``, no path on any
    filesystem); a tool reads it as ``/dev/fd/<fd>`` (pass the fd in ``pass_fds``). Not a pipe:
    skopeo opens its ``--decryption-key`` file twice (once to check it, once to use it), and
    each open of a memfd starts at its beginning. Closed when the block ends."""
    if len(data) > _SECRET_LIMIT:
        raise ImageError(f"a secret of {len(data)} bytes is not a key.",
                         fix="hand over a PEM key (a few hundred bytes).")
    fd = os.memfd_create("hfl-lab-secret", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, data)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)


@dataclass
class ToolRunner:
    """Runs the pipeline's commands and keeps a :class:`ToolRecord` of each."""

    env: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 300.0
    records: list[ToolRecord] = field(default_factory=list)

    def run(
        self,
        step: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        stdin: bytes | None = None,
        digest: Callable[[], str] | None = None,
        failure: Callable[[str], HflLabError] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to the end. On a non-zero exit raise ``failure(stderr)`` (default: an
        ``ImageError`` with the command and its last line); on success record the step with
        ``digest()`` (what it made)."""
        require_tools(argv[0])
        started = time.monotonic()
        try:
            result = subprocess.run(
                list(argv), input=stdin.decode() if stdin is not None else None,
                capture_output=True, text=True, env=self._env(env), pass_fds=tuple(pass_fds),
                timeout=self.timeout_s, check=False,
            )
        except subprocess.TimeoutExpired:
            raise ImageError(
                f"{step}: `{shlex.join(argv)}` did not finish within {self.timeout_s:.0f} s.",
                fix="check that the registry still runs (image/registry.log), then rerun.",
            ) from None
        seconds = time.monotonic() - started
        if result.returncode != 0:
            self.records.append(ToolRecord(step, tuple(argv), seconds, "", result.returncode))
            if failure is not None:
                raise failure(result.stderr)
            raise ImageError(
                f"{step}: `{shlex.join(argv)}` failed with exit code {result.returncode}: "
                f"{last_line(result.stderr)}",
                fix=f"fix what {argv[0]} reports, then rerun this step.",
            )
        self.records.append(ToolRecord(step, tuple(argv), seconds,
                                       digest() if digest is not None else ""))
        return result

    def spawn(
        self, step: str, argv: Sequence[str], *, log: IO[bytes], env: Mapping[str, str] | None,
        pass_fds: Sequence[int] = (), tool: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running ``argv`` (the registry) in its own process group, its stdin a
        pipe the caller holds; the caller records it once it serves (:meth:`record`).
        ``tool`` is the command that must be installed (default ``argv[0]``)."""
        require_tools(tool or argv[0])
        return subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
            env=self._env(env), pass_fds=tuple(pass_fds), start_new_session=True,
        )

    def record(self, step: str, argv: Sequence[str], seconds: float, digest: str = "") -> None:
        self.records.append(ToolRecord(step, tuple(argv), seconds, digest))

    def _env(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        return {**os.environ, **self.env, **(extra or {})}


def last_line(text: str) -> str:
    """The last non-empty line of a tool's output (its error, for skopeo and umoci)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"
