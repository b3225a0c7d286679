"""Which skin each VM wears: active, shadow, generation and original configuration, on disk.

One JSON file per VM under ``state_dir/vms`` (``file_name``: a libvirt VM ``DOMAIN/IFACE`` is
``DOMAIN%2FIFACE.json``). Skins are stored as copies of their documents, not
as names, so a restarted daemon re-applies exactly what was in force and a shadow survives edits
or deletion of its file. Files are written temp → fsync → rename → fsync(dir), so a crash
mid-write leaves the old file or the new one, never a torn one. The daemon is the only writer.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class SkinCopy:
    name: str
    document: dict  # the skin exactly as validated from its file
    source: str = ""  # the file it came from, for status and hot reload

    @classmethod
    def from_json(cls, data: dict | None) -> "SkinCopy | None":
        return cls(**data) if data else None


@dataclass
class Assignment:
    vm: str
    active: SkinCopy | None = None
    shadow: SkinCopy | None = None
    generation: int = 0
    original: dict | None = None  # identity captured before the first skin
    reload_error: str | None = None
    identity: dict = field(default_factory=dict)  # identity state the daemon applied (ip rules etc.)
    # The active skin's timeline as started: {"start_unix_ns", "seed"}, so a restart stays in phase.
    timeline: dict | None = None
    # A libvirt VM: the skin its domain's metadata named when the daemon last acted on it, so a
    # metadata change made while the domain was shut off is seen at its next start.
    metadata_skin: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Assignment":
        data = dict(data)
        data["active"] = SkinCopy.from_json(data.get("active"))
        data["shadow"] = SkinCopy.from_json(data.get("shadow"))
        return cls(**data)


class AssignmentStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "vms"

    def _path(self, vm: str) -> Path:
        return self.dir / file_name(vm)

    def load(self, vm: str) -> Assignment | None:
        try:
            return Assignment.from_json(json.loads(self._path(vm).read_text()))
        except FileNotFoundError:
            return None

    def save(self, assignment: Assignment) -> None:
        write_atomically(self._path(assignment.vm), json.dumps(assignment.to_json(), indent=2) + "\n")

    def delete(self, vm: str) -> None:
        try:
            self._path(vm).unlink()
        except FileNotFoundError:
            pass


def file_name(vm: str) -> str:
    """The state file of ``vm``: its name with '%' and '/' escaped (a ``[vms]`` name has neither,
    so its file keeps the plain name)."""
    return vm.replace("%", "%25").replace("/", "%2F") + ".json"


def write_atomically(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that readers and crashes see the old file or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # The rename is durable only once the directory entry is on disk too.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
