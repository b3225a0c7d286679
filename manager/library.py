"""The skin library, write side: create, update and delete drop-in skins.

Writes go through a temporary dot-file and a rename, so a reader (the daemon's hot reload) sees
the old file or the new one, never half of one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from interceptor import library
from interceptor.assignments import AssignmentStore, write_atomically
from interceptor.library import PRESETS_ENV, Entry, LibraryError, presets_dir
from interceptor.schema import SKIN_ALIASES, HostConfig, load_skin_file, read_skin_file

__all__ = ["PRESETS_ENV", "Entry", "LibraryError", "SkinLibrary", "entry_data", "effective_links",
           "presets_dir", "worn_by"]


def entry_data(entry: Entry) -> dict[str, Any]:
    """One library entry as plain data: the one shape of ``skins list/show --json`` and the API."""
    skin = None
    if entry.skin is not None:
        skin = entry.skin.model_dump(mode="json", exclude_none=True, exclude=set(SKIN_ALIASES))
    return {
        "name": entry.name,
        "origin": entry.origin,
        "path": str(entry.path),
        "valid": entry.skin is not None,
        "errors": list(entry.errors),
        "skin": skin,
    }


def effective_links(entry: Entry) -> dict[str, dict[str, float]]:
    """The one-way conditions a valid entry gives each direction."""
    assert entry.skin is not None
    return {d: entry.skin.link(d).model_dump() for d in ("uplink", "downlink")}


def worn_by(config: HostConfig, name: str) -> str | None:
    """The first VM whose active skin is ``name`` (such a skin must not be deleted), or None."""
    store = AssignmentStore(Path(config.state_dir))
    for vm in config.vms:
        assignment = store.load(vm)
        if assignment and assignment.active and assignment.active.name == name:
            return vm
    return None


def in_use_message(name: str, vm: str) -> str:
    return f"skin {name!r} is active on VM {vm!r}; apply another skin to it or `netskin revert {vm}` first"


class SkinLibrary(library.SkinLibrary):
    def create(self, source: Path) -> Entry:
        """Copy a valid skin file into the drop-in directory under the skin's name."""
        skin = load_skin_file(source)
        existing = {entry.name: entry for entry in self.entries()}
        if skin.name in existing:
            entry = existing[skin.name]
            kind = "a preset" if entry.origin == "preset" else "a drop-in"
            raise LibraryError(
                f"skin {skin.name!r} already exists ({kind}, {entry.path}); "
                f"use `netskin skins update {skin.name} {source}` to replace it"
            )
        return self._write(skin.name, source)

    def update(self, name: str, source: Path) -> Entry:
        """Replace skin ``name`` with ``source``; a preset gets a drop-in that overrides it."""
        entry = self.entry(name)
        # The file's stem does not name the skin here: the command line does.
        skin = load_skin_file(source, default_name=name)
        if skin.name != name:
            raise LibraryError(
                f"{source} names skin {skin.name!r}, not {name!r}; change its name field or "
                f"use `netskin skins create {source}`"
            )
        written = self._write(name, source)
        if entry.origin == "drop-in" and entry.path != written.path:
            entry.path.unlink(missing_ok=True)
        return written

    def delete(self, name: str) -> Entry:
        """Remove the drop-in file of ``name``; a preset it overrode becomes visible again."""
        entry = self.entry(name)
        if entry.origin == "preset":
            raise LibraryError(
                f"skin {name!r} is a preset ({entry.path}) and cannot be deleted; "
                f"presets ship with netskin"
            )
        try:
            entry.path.unlink()
        except OSError as error:
            raise LibraryError(f"cannot delete {entry.path}: {error.strerror}") from None
        return entry

    def _write(self, name: str, source: Path) -> Entry:
        """Copy ``source`` byte for byte (comments and all) to ``skins_dir/NAME.suffix``."""
        target = self.skins_dir / f"{name}{source.suffix.lower()}"
        try:
            self.skins_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(target, source.read_bytes(), mode=0o644)  # skins are not secrets
        except OSError as error:
            raise LibraryError(
                f"cannot write {target}: {error.strerror}; check skins_dir in the host "
                f"configuration and its permissions"
            ) from None
        document, skin = read_skin_file(target)
        return Entry(name, target, "drop-in", skin=skin, document=document)

