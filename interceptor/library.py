"""The skin library, read side: drop-in skin files plus the preset catalogue, by skin name.

Presets ship in ``rules/presets``; drop-ins live in the host's ``skins_dir`` and override a preset
of the same name. The daemon reads it (start-up, hot reload); the manager adds the writes
(``manager.library``). Each entry keeps the document as written, which is what an assignment
stores as its copy of the skin.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from interceptor.profiles import packaged_rules_dir
from interceptor.schema import SKIN_SUFFIXES, HostConfig, Skin, SkinError, UserError, read_skin_file

PRESETS_ENV = "NETSKIN_PRESETS_DIR"


class LibraryError(UserError):
    """A library operation the user asked for cannot be done (unknown name, name taken)."""


def presets_dir() -> Path:
    """$NETSKIN_PRESETS_DIR, else ``rules/presets`` as installed with netskin."""
    override = os.environ.get(PRESETS_ENV)
    if override:
        return Path(override)
    return packaged_rules_dir() / "presets"


@dataclass(frozen=True)
class Entry:
    """One skin in the library: valid (``skin`` set) or not (``errors`` set)."""

    name: str
    path: Path
    origin: Literal["preset", "drop-in", "store"]
    skin: Skin | None = None
    errors: tuple[str, ...] = ()
    document: dict | None = None  # the file's fields as written, when it parsed and validated


class SkinLibrary:
    def __init__(self, skins_dir: Path, presets: Path | None = None):
        self.skins_dir = Path(skins_dir)
        self.presets = presets if presets is not None else presets_dir()

    @classmethod
    def for_config(cls, config: HostConfig) -> "SkinLibrary":
        return cls(config.skins_dir)

    def stamp(self) -> tuple:
        """Changes whenever a skin file is added, removed or rewritten (for hot reload)."""
        files = []
        for directory in (self.skins_dir, self.presets):
            try:
                for entry in os.scandir(directory):
                    if not entry.name.startswith(".") and entry.is_file():
                        st = entry.stat()
                        files.append((entry.path, st.st_mtime_ns, st.st_size, st.st_ino))
            except FileNotFoundError:
                continue
        return tuple(sorted(files))

    def entries(self) -> list[Entry]:
        """Every skin by name, sorted; a drop-in replaces the preset of the same name."""
        by_name = {entry.name: entry for entry in _scan(self.presets, "preset")}
        drop_ins: dict[str, Entry] = {}
        for entry in _scan(self.skins_dir, "drop-in"):
            if entry.name in drop_ins:
                first = drop_ins[entry.name].path
                entry = Entry(
                    entry.name,
                    entry.path,
                    "drop-in",
                    errors=(f"{entry.path}: name: skin {entry.name!r} is also defined by {first}; "
                            f"rename or remove one",),
                )
            else:
                drop_ins[entry.name] = entry
            by_name[entry.name] = entry
        return sorted(by_name.values(), key=lambda entry: entry.name)

    def entry(self, name: str) -> Entry:
        """The library entry for ``name``, valid or not."""
        entries = {entry.name: entry for entry in self.entries()}
        if name in entries:
            return entries[name]
        near = difflib.get_close_matches(name, list(entries), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise LibraryError(
            f"unknown skin {name!r}{hint}; `netskin skins list` shows the skins there are"
        )

    def get(self, name: str) -> Skin:
        """The valid skin called ``name``; an invalid file raises its ``SkinError``."""
        entry = self.entry(name)
        if entry.skin is None:
            raise SkinError(list(entry.errors))
        return entry.skin


def preset_entries() -> list[Entry]:
    """The preset catalogue alone (a fleet manager's library is the store, plus these)."""
    return _scan(presets_dir(), "preset")


def _scan(directory: Path, origin: Literal["preset", "drop-in"]) -> list[Entry]:
    if not directory.is_dir():
        return []
    entries = []
    # Dot-files are skipped: they are editor swap files and our own half-written temporaries.
    for path in sorted(directory.iterdir()):
        hidden = path.name.startswith(".")
        if hidden or path.suffix.lower() not in SKIN_SUFFIXES or not path.is_file():
            continue
        try:
            document, skin = read_skin_file(path)
        except SkinError as error:
            entries.append(Entry(path.stem, path, origin, errors=tuple(error.lines)))
        else:
            entries.append(Entry(skin.name, path, origin, skin=skin, document=document))
    return entries
