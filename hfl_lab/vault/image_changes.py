"""How a batch of file writes and deletes becomes debugfs runs on the in-memory ext4 image.

Small files are written by debugfs; big ones are only allocated by it and their data is copied
into the mapped image here (``extents``). Each run ends by listing the folders it touched, and
those listings are kept, so a commit costs about two debugfs runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import numpy as np
import numpy.typing as npt

from hfl_lab.vault.ext4_image import Ext4Image, Extent, check_path, memfd_with
from hfl_lab.vault.extents import (
    Allocation,
    allocation,
    initialize_commands,
    leaf_extents,
    place,
)
from hfl_lab.vault.files import Data
from hfl_lab.vault.xts import SECTOR_SIZE

# Files at least this big are allocated by debugfs and filled by this process (see extents);
# smaller ones are cheaper to hand to debugfs whole.
PREALLOCATE_MIN = 256 * 1024

Mask = npt.NDArray[np.bool_]


class ImageChanges:
    """Changes to the file system in ``image``, made with debugfs."""

    def __init__(self, image: Ext4Image) -> None:
        self.image = image

    def apply(
        self,
        writes: Sequence[tuple[str, Data]],
        deletes: Sequence[str],
        placed: dict[str, list[Extent]],
        pending: Sequence[str],
    ) -> tuple[list[str], list[str], list[str]]:
        """Change the in-memory image with one debugfs run (``pending`` commands first);
        returns the fresh paths whose blocks were free on disk (taken before the run removed
        anything), the replaced paths, and the commands left for the next run.

        Small files are written by debugfs; big ones are only allocated, their data is copied
        into the mapped image here (extents added to ``placed``), and the commands that mark
        their extents initialized are left for the next run: they change only the inode, which
        reaches the disk with the rest of the metadata.
        """
        block = self.image.block_size
        allocations = {
            path: allocation(path, memoryview(data).nbytes, block)
            for path, data in writes
            if memoryview(data).nbytes >= PREALLOCATE_MIN
        }
        fresh, folders, script = self._script(writes, deletes, allocations)
        commands = [*pending, *script]
        contents = dict(writes)
        sources = [b"" if path in allocations else data for path, data in writes]
        outputs = self._run(commands, sources, folders)
        left: list[str] = []
        rewritten: list[Data] = []
        rewrite: list[str] = []
        for path, allocated in allocations.items():
            extents = leaf_extents(outputs[commands.index(f"ex {path}")], allocated.blocks)
            if extents is None:
                rewrite += self._rewrite_commands(allocated, len(rewritten))
                rewritten.append(contents[path])
                continue
            left += initialize_commands(path, extents)
            placed[path] = [Extent(e.logical, e.physical, e.length, False) for _, e in extents]
        if rewrite:
            # After the first run's removals: these blocks may hold what is still on disk.
            self._run(rewrite, rewritten, folders)
        for path in allocations:
            if path in placed:
                place(self.image.bytes, block, placed[path], contents[path])
        replaced = [path for path, _ in writes if path not in fresh]
        return [path for path in fresh if path in placed or path not in allocations], replaced, left

    def _run(
        self, commands: Sequence[str], sources: Sequence[Data], folders: Sequence[str]
    ) -> list[str]:
        """One debugfs write run; ``{i}`` in a command names a file holding ``sources[i]``.

        The run ends by listing ``folders``, whose listings are remembered: the next commit
        and the next read start with them, instead of with debugfs runs of their own.
        """
        listings = [self.image.listing_command(folder or "/") for folder in folders]
        with ExitStack() as stack:
            empty = stack.enter_context(memfd_with(b""))
            fds = [
                stack.enter_context(memfd_with(data)) if memoryview(data).nbytes else empty
                for data in sources
            ]
            names = [f"/proc/self/fd/{fd}" for fd in fds]
            outputs = self.image.run(
                [c.format(*names) for c in commands] + listings,
                write=True,
                pass_fds=sorted({empty, *fds}),
            )
        if len(outputs) == len(commands) + len(listings):
            for folder, output in zip(folders, outputs[len(commands) :], strict=True):
                self.image.remember_listing(folder or "/", output)
        return outputs[: len(commands)]

    @staticmethod
    def _rewrite_commands(allocated: Allocation, source: int) -> list[str]:
        """Give ``path`` its data the slow way: its blocks did not fit in its inode (a file
        system too fragmented for four extents), so ``sif`` cannot initialize them."""
        path = allocated.path
        return [f"rm {path}", f"write {{{source}}} {path}", f"sif {path} mode 0100600"]

    def _script(
        self,
        writes: Sequence[tuple[str, Data]],
        deletes: Sequence[str],
        allocations: dict[str, Allocation],
    ) -> tuple[list[str], list[str], list[str]]:
        """The fresh paths, the folders touched, and the debugfs commands: fresh files first,
        so they only take blocks free on disk."""
        paths = [check_path(path) for path, _ in writes]
        folders = sorted({path.rpartition("/")[0] for path in [*paths, *map(check_path, deletes)]})
        existing: dict[str, dict[str, int]] = {}
        commands: list[str] = []
        for folder in folders:
            found = self.image.listing(folder or "/")
            if found is None and folder:
                parts = folder.strip("/").split("/")
                for depth in range(1, len(parts) + 1):
                    prefix = "/" + "/".join(parts[:depth])
                    if not self.image.exists(prefix) and f"mkdir {prefix}" not in commands:
                        commands.append(f"mkdir {prefix}")
            existing[folder] = found or {}
        fresh = [p for p in paths if p.rpartition("/")[2] not in existing[p.rpartition("/")[0]]]
        replaced = [p for p in paths if p not in fresh]
        for path in [*fresh, *replaced]:
            index = paths.index(path)
            if path in replaced:
                commands.append(f"rm {path}")
            if path in allocations:
                commands += allocations[path].commands(f"{{{index}}}")
            else:
                commands += [f"write {{{index}}} {path}", f"sif {path} mode 0100600"]
        for path in map(check_path, deletes):
            if path.rpartition("/")[2] in existing[path.rpartition("/")[0]]:
                commands.append(f"rm {path}")
        return fresh, folders, commands

    def sectors_of(self, paths: Sequence[str], known: dict[str, list[Extent]]) -> Mask:
        """Mask of the sectors holding the data of ``paths`` (extents ``known`` or looked up)."""
        mask = np.zeros(self.image.size // SECTOR_SIZE, dtype=bool)
        per_block = self.image.block_size // SECTOR_SIZE
        for path in paths:
            extents = known[path] if path in known else self.image.layout(path).extents
            for extent in extents:
                start = extent.physical * per_block
                mask[start : start + extent.length * per_block] = True
        return mask
