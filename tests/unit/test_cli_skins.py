"""`netskin skins ...` through typer's CliRunner, against a temporary config and skins_dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from manager.cli import app
from manager.library import PRESETS_ENV, SkinLibrary, presets_dir

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

runner = CliRunner()


@pytest.fixture
def host(tmp_path, monkeypatch):
    """A host configuration whose skins_dir is an empty temporary directory."""
    monkeypatch.delenv("NETSKIN_CONFIG", raising=False)
    monkeypatch.delenv(PRESETS_ENV, raising=False)
    config = tmp_path / "netskin.toml"
    config.write_text('skins_dir = "skins.d"\n')
    return config


def netskin(*args: str):
    return runner.invoke(app, [str(arg) for arg in args])


def listed(config: Path) -> dict[str, dict]:
    result = netskin("skins", "list", "--json", "--config", config)
    assert result.exit_code == 0, result.stderr
    return {entry["name"]: entry for entry in json.loads(result.stdout)}


# --- validate ------------------------------------------------------------------------------------


def test_validate_prints_ok_per_valid_file():
    result = netskin("skins", "validate", EXAMPLES / "persona.json", EXAMPLES / "Mobile_US_East.json")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == ["ok field-tester", "ok Mobile_US_East"]


def test_validate_exits_1_with_one_line_per_error():
    bad = EXAMPLES / "invalid-loss.yaml"
    result = netskin("skins", "validate", EXAMPLES / "persona.json", bad)
    assert result.exit_code == 1
    assert result.stdout.splitlines() == ["ok field-tester"]
    assert result.stderr.splitlines() == [f"{bad}: packet_loss_percent: 150 is out of range (allowed 0–100)"]


def test_validate_json_reports_each_file():
    result = netskin("skins", "validate", "--json", EXAMPLES / "invalid-loss.yaml", EXAMPLES / "persona.json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert [r["valid"] for r in report] == [False, True]
    assert "packet_loss_percent" in report[0]["errors"][0]


def test_validate_every_preset_from_the_command_line():
    presets = sorted(presets_dir().glob("*.toml"))
    result = netskin("skins", "validate", *presets)
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == len(presets)


# --- list and show ---------------------------------------------------------------------------------


def test_list_json_holds_presets_and_drop_ins_and_a_drop_in_overrides_its_preset(host):
    skins_dir = host.parent / "skins.d"
    skins_dir.mkdir()
    (skins_dir / "mine.yaml").write_text("latency_ms: 10\n")
    (skins_dir / "dsl.json").write_text('{"latency_ms": 1}')
    (skins_dir / "broken.yaml").write_text("mtu: 1\n")
    entries = listed(host)
    assert entries["3g-average"]["origin"] == "preset"
    assert entries["mine"]["origin"] == "drop-in"
    assert entries["mine"]["skin"]["latency_ms"] == 10
    assert entries["dsl"]["origin"] == "drop-in"
    assert entries["dsl"]["path"] == str(skins_dir / "dsl.json")
    assert entries["broken"]["valid"] is False
    assert "mtu: 1 is out of range (allowed 68–65535)" in entries["broken"]["errors"][0]


def test_list_table_for_people(host):
    result = netskin("skins", "list", "--config", host)
    assert result.exit_code == 0
    assert "3g-average" in result.stdout and "preset" in result.stdout


def test_show_json_gives_the_effective_one_way_values(host):
    result = netskin("skins", "show", "3g-average", "--json", "--config", host)
    assert result.exit_code == 0
    shown = json.loads(result.stdout)
    assert shown["effective"]["downlink"] == {
        "delay_ms": 100, "jitter_ms": 0, "loss_percent": 0, "rate_kbps": 780,
        "jitter_distribution": "uniform", "jitter_correlation_ms": None, "trace": None,
    }  # fmt: skip
    table = netskin("skins", "show", "3g-average", "--config", host)
    assert table.exit_code == 0 and "downlink" in table.stdout


def test_show_unknown_skin_is_one_line_with_the_fix(host):
    result = netskin("skins", "show", "3g-avrage", "--config", host)
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert "unknown skin '3g-avrage'" in line
    assert "did you mean '3g-average'" in line
    assert "netskin skins list" in line


def test_a_missing_named_config_is_one_line(tmp_path):
    result = netskin("skins", "list", "--config", tmp_path / "absent.toml")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"{tmp_path / 'absent.toml'}: no such file (named by --config); give the host configuration's path"
    ]


def test_the_config_comes_from_the_environment(host, monkeypatch):
    (host.parent / "skins.d").mkdir()
    (host.parent / "skins.d" / "from-env.toml").write_text("latency_ms = 3\n")
    monkeypatch.setenv("NETSKIN_CONFIG", str(host))
    result = netskin("skins", "show", "from-env", "--json")
    assert result.exit_code == 0, result.stderr


def test_an_invalid_config_is_reported_per_line(tmp_path):
    config = tmp_path / "netskin.toml"
    config.write_text('fail_mode = "maybe"\nskins_dirr = "x"\n')
    result = netskin("skins", "list", "--config", config)
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 2
    assert "Traceback" not in result.output


# --- create / update / delete ------------------------------------------------------------------------


def test_create_update_delete_round_trip(host, tmp_path):
    skins_dir = host.parent / "skins.d"
    created = netskin("skins", "create", EXAMPLES / "bursty-wifi.yaml", "--config", host)
    assert created.exit_code == 0, created.stderr
    assert created.stdout.startswith("created bursty-wifi")
    assert (skins_dir / "bursty-wifi.yaml").read_bytes() == (EXAMPLES / "bursty-wifi.yaml").read_bytes()
    assert listed(host)["bursty-wifi"]["origin"] == "drop-in"

    again = netskin("skins", "create", EXAMPLES / "bursty-wifi.yaml", "--config", host)
    assert again.exit_code == 1
    assert "already exists" in again.stderr and "netskin skins update bursty-wifi" in again.stderr

    # An update file without a name takes the name from the command line, and may change format.
    replacement = tmp_path / "whatever.json"
    replacement.write_text('{"latency_ms": 300}')
    updated = netskin("skins", "update", "bursty-wifi", replacement, "--config", host)
    assert updated.exit_code == 0, updated.stderr
    assert sorted(p.name for p in skins_dir.iterdir()) == ["bursty-wifi.json"]
    assert listed(host)["bursty-wifi"]["skin"]["latency_ms"] == 300

    deleted = netskin("skins", "delete", "bursty-wifi", "--config", host)
    assert deleted.exit_code == 0
    assert "bursty-wifi" not in listed(host)
    assert list(skins_dir.iterdir()) == []


def test_create_refuses_an_invalid_file(host):
    result = netskin("skins", "create", EXAMPLES / "invalid-loss.yaml", "--config", host)
    assert result.exit_code == 1
    assert "packet_loss_percent: 150" in result.stderr
    assert not (host.parent / "skins.d").exists()


def test_create_refuses_a_preset_name_and_update_overrides_the_preset(host, tmp_path):
    mine = tmp_path / "dsl.toml"
    mine.write_text("latency_ms = 1\n")
    refused = netskin("skins", "create", mine, "--config", host)
    assert refused.exit_code == 1 and "a preset" in refused.stderr

    updated = netskin("skins", "update", "dsl", mine, "--config", host)
    assert updated.exit_code == 0 and "overrides the preset" in updated.stdout
    assert listed(host)["dsl"]["origin"] == "drop-in"

    deleted = netskin("skins", "delete", "dsl", "--config", host)
    assert deleted.exit_code == 0 and "visible again" in deleted.stdout
    assert listed(host)["dsl"]["origin"] == "preset"


def test_delete_refuses_presets_and_unknown_names(host):
    preset = netskin("skins", "delete", "dsl", "--config", host)
    assert preset.exit_code == 1 and "is a preset" in preset.stderr
    unknown = netskin("skins", "delete", "nope", "--config", host)
    assert unknown.exit_code == 1 and "unknown skin 'nope'" in unknown.stderr


def test_update_refuses_a_file_naming_another_skin(host):
    netskin("skins", "create", EXAMPLES / "Mobile_US_East.json", "--config", host)
    result = netskin("skins", "update", "Mobile_US_East", EXAMPLES / "persona.json", "--config", host)
    assert result.exit_code == 1
    assert "names skin 'field-tester', not 'Mobile_US_East'" in result.stderr


# --- the library directly ---------------------------------------------------------------------------


def test_presets_dir_can_be_overridden(tmp_path, monkeypatch):
    (tmp_path / "only.toml").write_text("latency_ms = 1\n")
    monkeypatch.setenv(PRESETS_ENV, str(tmp_path))
    library = SkinLibrary(tmp_path / "none")
    assert [(e.name, e.origin) for e in library.entries()] == [("only", "preset")]


def test_two_drop_ins_with_one_name_are_reported_not_guessed(tmp_path):
    (tmp_path / "a.yaml").write_text("name: same\n")
    (tmp_path / "b.yaml").write_text("name: same\n")
    library = SkinLibrary(tmp_path, presets=tmp_path / "no-presets")
    [entry] = library.entries()
    assert entry.skin is None and "also defined by" in entry.errors[0]


def test_temporary_and_hidden_files_are_not_skins(tmp_path):
    (tmp_path / ".x.yaml.123.tmp").write_text("latency_ms: 1\n")
    (tmp_path / ".hidden.yaml").write_text("latency_ms: 1\n")
    (tmp_path / "notes.txt").write_text("hello")
    assert SkinLibrary(tmp_path, presets=tmp_path / "none").entries() == []


def test_delete_refuses_a_skin_a_vm_wears(tmp_path):
    from interceptor.assignments import Assignment, AssignmentStore, SkinCopy

    skins = tmp_path / "skins"
    skins.mkdir()
    (skins / "worn.json").write_text('{"latency_ms": 10}')
    config = tmp_path / "host.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\nskins_dir = "{skins}"\n'
        '[vms.web1]\ninterface = "tap-web1"\naddress = "10.77.1.2"\n'
    )
    AssignmentStore(tmp_path / "state").save(
        Assignment(vm="web1", active=SkinCopy("worn", {"latency_ms": 10}), generation=1)
    )
    result = runner.invoke(app, ["skins", "delete", "worn", "--config", str(config)])
    assert result.exit_code == 1
    assert "web1" in result.output and "revert" in result.output
    assert (skins / "worn.json").exists()
