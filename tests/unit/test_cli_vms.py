"""`netskin vms` without libvirt: the host config's VMs; with an unreachable libvirt: one line, exit 1."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from manager.cli import app

runner = CliRunner()


def test_vms_lists_the_configured_vms(tmp_path):
    config = tmp_path / "netskin.toml"
    config.write_text('[vms.web1]\ninterface = "tap-web1"\naddress = "10.77.1.2"\nskin = "3g"\n')
    result = runner.invoke(app, ["vms", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["libvirt"] is None and data["problems"] == []
    (vm,) = data["vms"]
    assert (vm["name"], vm["source"], vm["tap"], vm["skin"], vm["address"]) == ("web1", "config", "tap-web1", "3g",
                                                                               "10.77.1.2")


def test_an_unreachable_libvirt_is_one_line_and_exit_1(tmp_path):
    config = tmp_path / "netskin.toml"
    config.write_text(f'[libvirt]\nuri = "qemu+unix:///system?socket={tmp_path}/absent-sock"\n')
    result = runner.invoke(app, ["vms", "--config", str(config)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "Failed to connect socket" in result.output or "libvirt-python binding" in result.output
