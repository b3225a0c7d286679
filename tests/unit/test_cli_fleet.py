"""The CLI and API on a fleet manager without etcd: which configuration is a manager, fleet-only
options on one host, an unreachable store, the apply report, the fleet's OpenAPI paths."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from interceptor.schema import load_host_config
from manager import api, cli_fleet
from manager.cli import app
from manager.fleet import Desired, SkinDocument, Status
from manager.fleetctl import Change, Outcome, Step, Target

runner = CliRunner()
UNREACHABLE = "http://127.0.0.1:9"  # discard: nothing listens there


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(f'state_dir = "{tmp_path}/state"\nskins_dir = "{tmp_path}/skins.d"\n'
                    f'control_socket = "{tmp_path}/control.sock"\n' + text)
    return path


def manager_config(tmp_path):
    return write(tmp_path, "manager.toml", f'[store]\nendpoints = ["{UNREACHABLE}"]\n')


def test_which_configuration_is_a_manager(tmp_path):
    vm = '[vms.vm1]\ninterface = "tap1"\naddress = "10.0.0.2"\n'
    assert cli_fleet.is_manager(load_host_config(manager_config(tmp_path)))
    host = write(tmp_path, "host.toml", vm + f'[store]\nendpoints = ["{UNREACHABLE}"]\n')
    assert not cli_fleet.is_manager(load_host_config(host))
    assert not cli_fleet.is_manager(load_host_config(write(tmp_path, "single.toml", vm)))


def test_fleet_options_on_one_host_are_refused(tmp_path):
    single = write(tmp_path, "single.toml", '[vms.vm1]\ninterface = "tap1"\naddress = "10.0.0.2"\n')
    result = runner.invoke(app, ["apply", "vm1", "slow", "--at", "+3s", "--wait", "2", "--config", str(single)])
    assert result.exit_code == 1
    assert "--at and --wait: fleet options; they need a manager configuration" in result.output


def test_an_unreachable_store_is_exit_2(tmp_path):
    config = manager_config(tmp_path)
    for args in (["status"], ["apply", "vm1", "slow"], ["skins", "list"]):
        result = runner.invoke(app, [*args, "--config", str(config)])
        assert result.exit_code == 2, (args, result.output)
        assert "the fleet store (http://127.0.0.1:9) did not answer" in result.output
    result = runner.invoke(app, ["status", "--json", "--config", str(config)])
    assert json.loads(result.stdout.split("\nthe fleet store")[0])["exit_code"] == 2


def test_outcome_report_and_swap_spread():
    slow = SkinDocument(name="slow", document={"latency_ms": 100})
    steps = tuple(Step(Target(h, v), 0, None, Desired(skin=slow, generation=1, at=100.0)) for h, v in
                  (("hv1", "vm1"), ("hv2", "b1"), ("hv3", "c1")))
    change = Change("op1", "apply", steps, at=100.0)
    swapped = {Target("hv1", "vm1"): 100.002, Target("hv2", "b1"): 100.0125}
    statuses = {t: Status(applied_rev=7, state="enforced", skin="slow", generation=3, enforced_generation=3,
                          swapped_at=s, at=101.0) for t, s in swapped.items()}
    statuses[Target("hv3", "c1")] = None
    outcome = Outcome(change, 7, done=list(swapped), failed=[], pending=[Target("hv3", "c1")], statuses=statuses,
                      restored=[t.target for t in steps])
    data = cli_fleet.outcome_data(outcome, "slow")
    assert data["spread_ms"] == 10.5
    assert [t["state"] for t in data["targets"]] == ["done", "done", "pending"]
    assert data["targets"][0]["late_ms"] == 2.0
    assert data["verified"] is False and data["problems"] == ["hv3/c1: not in force yet"]
    assert data["restored"] == ["hv1/vm1", "hv2/b1", "hv3/c1"]


def test_the_fleet_openapi_document():
    document = api.openapi_document(fleet=True)
    assert "/hosts" in document["paths"] and "/fleet/apply" in document["paths"]
    assert "/metrics" not in document["paths"]
    params = {p["name"] for p in document["paths"]["/vms/{vm_id}/skins/{name}"]["post"]["parameters"]}
    assert params == {"vm_id", "name", "host", "wait", "at"}
    assert "/hosts" not in api.openapi_document()["paths"]


def test_a_manager_serves_the_fleet_routes(tmp_path):
    app_ = api.create_app(load_host_config(manager_config(tmp_path)))
    paths = {route.path for route in app_.routes}
    assert {"/hosts", "/fleet/apply", "/vms/{vm_id}/persona/{persona_id}"} <= paths and "/metrics" not in paths
