"""The `netskin` command line: a thin shell over the host configuration and the skin library.

Commands print tables for people and JSON with --json. A problem the user can fix (a bad file,
an unknown name) ends the command with exit code 1 and one line per problem on stderr, never a
traceback: raise a ``UserError`` or call ``fail``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from interceptor.schema import (
    DEFAULT_CONFIG_PATH,
    SKIN_ALIASES,
    HostConfig,
    SkinError,
    UserError,
    load_host_config,
    load_skin_file,
)
from manager.library import Entry, SkinLibrary

# --- shared pieces: every command group uses these -------------------------------------------

ConfigOption = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        metavar="PATH",
        show_default=False,
        help=f"Host configuration (default: $NETSKIN_CONFIG, else {DEFAULT_CONFIG_PATH}).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

console = Console()


class _UserErrorsExit1(TyperGroup):
    """Turns a ``UserError`` raised anywhere below into its lines on stderr and exit code 1."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as error:
            for line in error.lines:
                typer.echo(line, err=True)
            raise typer.Exit(1) from None


def fail(message: str, code: int = 1) -> NoReturn:
    """End the command: ``message`` (one line naming the problem and the fix) on stderr."""
    typer.echo(message, err=True)
    raise typer.Exit(code)


def load_config(config_path: Path | None) -> HostConfig:
    """The host configuration from --config, else $NETSKIN_CONFIG, else the default path."""
    return load_host_config(config_path)


def open_library(config_path: Path | None) -> SkinLibrary:
    return SkinLibrary(load_config(config_path).skins_dir)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


app = typer.Typer(
    cls=_UserErrorsExit1,
    no_args_is_help=True,
    add_completion=False,
    help="netskin: per-VM network skins (loss, delay, rate, firewall, DNS, identity).",
)


def main() -> None:
    app()


# --- netskin skins ---------------------------------------------------------------------------

skins_app = typer.Typer(
    no_args_is_help=True, help="The skin library: drop-in directory plus presets."
)
app.add_typer(skins_app, name="skins")


@skins_app.command("list")
def skins_list(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List every skin: drop-ins (which override presets of the same name) and presets."""
    entries = open_library(config).entries()
    if as_json:
        print_json([_entry_data(entry) for entry in entries])
        return
    table = Table(box=box.SIMPLE_HEAD, caption="down, up: rate limit in kbit/s (∞: unlimited)")
    table.add_column("name", no_wrap=True)
    table.add_column("origin", no_wrap=True)
    for heading in ("RTT ms", "down", "up", "loss %"):
        table.add_column(heading, justify="right", no_wrap=True)
    # One row per skin: the notes get what the numbers leave and are cut, not wrapped.
    notes_width = max(12, console.width - 72)
    table.add_column("notes", no_wrap=True, overflow="ellipsis", max_width=notes_width)
    for entry in entries:
        if entry.skin is None:
            problem = entry.errors[0].removeprefix(f"{entry.path}: ")
            table.add_row(entry.name, entry.origin, "", "", "", "", f"[red]invalid:[/] {problem}")
            continue
        down, up = entry.skin.link("downlink"), entry.skin.link("uplink")
        table.add_row(
            entry.name,
            entry.origin,
            _number(down.delay_ms + up.delay_ms),
            _number(down.rate_kbps) if down.rate_kbps else "∞",
            _number(up.rate_kbps) if up.rate_kbps else "∞",
            _loss(entry),
            entry.skin.description or "",
        )
    console.print(table)


@skins_app.command("show")
def skins_show(name: str, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Show one skin: its fields and the effective conditions in each direction."""
    entry = open_library(config).entry(name)
    if entry.skin is None:
        raise SkinError(list(entry.errors))
    skin = entry.skin
    if as_json:
        print_json(_entry_data(entry) | {"effective": _effective(entry)})
        return
    fields = Table("field", "value", title=f"{skin.name} ({entry.origin}, {entry.path})")
    for key, value in _skin_data(entry).items():
        if key not in ("uplink", "downlink"):
            fields.add_row(key, _value(value))
    console.print(fields)
    links = Table(
        "direction", "delay ms (one-way)", "jitter ms", "loss %", "rate kbit/s",
        title="effective per direction (uplink: leaving the VM)",
    )
    for direction, link in _effective(entry).items():
        bursty = skin.bursty_loss(direction)
        links.add_row(
            direction,
            _number(link["delay_ms"]),
            _number(link["jitter_ms"]),
            "bursty (Gilbert-Elliott)" if bursty else _number(link["loss_percent"]),
            _rate(link["rate_kbps"]),
        )
    console.print(links)


@skins_app.command("validate")
def skins_validate(
    files: Annotated[list[Path], typer.Argument(metavar="FILE", show_default=False)],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check skin files against the schema: "ok NAME" per valid file, one line per error."""
    results = []
    for path in files:
        try:
            skin = load_skin_file(path)
        except SkinError as error:
            results.append({"file": str(path), "valid": False, "name": None, "errors": error.lines})
        else:
            results.append({"file": str(path), "valid": True, "name": skin.name, "errors": []})
    if as_json:
        print_json(results)
    else:
        for result in results:
            if result["valid"]:
                typer.echo(f"ok {result['name']}")
            for line in result["errors"]:
                typer.echo(line, err=True)
    if not all(result["valid"] for result in results):
        raise typer.Exit(1)


@skins_app.command("create")
def skins_create(
    file: Annotated[Path, typer.Argument(metavar="FILE")], config: ConfigOption = None
) -> None:
    """Add a new skin to the drop-in directory (its name must not exist yet)."""
    entry = open_library(config).create(file)
    typer.echo(f"created {entry.name} ({entry.path})")


@skins_app.command("update")
def skins_update(
    name: str, file: Annotated[Path, typer.Argument(metavar="FILE")], config: ConfigOption = None
) -> None:
    """Replace a skin with FILE; updating a preset creates a drop-in that overrides it."""
    library = open_library(config)
    was_preset = library.entry(name).origin == "preset"
    entry = library.update(name, file)
    note = "; it overrides the preset of that name" if was_preset else ""
    typer.echo(f"updated {entry.name} ({entry.path}){note}")


@skins_app.command("delete")
def skins_delete(name: str, config: ConfigOption = None) -> None:
    """Remove a drop-in skin (presets cannot be deleted)."""
    library = open_library(config)
    entry = library.delete(name)
    uncovered = any(e.name == name and e.origin == "preset" for e in library.entries())
    note = f"; the preset {name} is visible again" if uncovered else ""
    typer.echo(f"deleted {entry.name} ({entry.path}){note}")


def _skin_data(entry: Entry) -> dict[str, Any]:
    assert entry.skin is not None
    return entry.skin.model_dump(mode="json", exclude_none=True, exclude=set(SKIN_ALIASES))


def _entry_data(entry: Entry) -> dict[str, Any]:
    return {
        "name": entry.name,
        "origin": entry.origin,
        "path": str(entry.path),
        "valid": entry.skin is not None,
        "errors": list(entry.errors),
        "skin": None if entry.skin is None else _skin_data(entry),
    }


def _effective(entry: Entry) -> dict[str, dict[str, float]]:
    assert entry.skin is not None
    return {d: entry.skin.link(d).model_dump() for d in ("uplink", "downlink")}


def _value(value: Any) -> str:
    if isinstance(value, float):
        return _number(value)
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _number(value: float) -> str:
    return f"{value:g}"


def _rate(kbps: float) -> str:
    return _number(kbps) if kbps else "unlimited"


def _loss(entry: Entry) -> str:
    assert entry.skin is not None
    if entry.skin.loss_model.gilbert_elliott is not None:
        return "bursty"
    down, up = entry.skin.link("downlink").loss_percent, entry.skin.link("uplink").loss_percent
    return _number(down) if down == up else f"{_number(down)} / {_number(up)}"


# --- further command groups (lab, demo, apply, rollback, revert, status, top, serve) ---------
# Reuse ConfigOption, JsonOption, load_config, fail and print_json; raise UserError for
# problems the user can fix.
