"""The REST API's error mapping and persona ids, against the fake daemon of test_cli_daemon.

Starlette's TestClient drives the real app in-process; the daemon side is a real control socket.
"""

from __future__ import annotations

import re
import warnings

import pytest

from interceptor.schema import load_host_config
from manager.api import create_app
from tests.unit.test_cli_daemon import FakeDaemon, write_host_config

with warnings.catch_warnings():  # starlette would rather have httpx2; httpx is what is installed
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

# The first seed's persona exactly as written: no name.
SEED_PERSONA = {"qos_priority": 7, "security_profile": "standard", "simulated_latency_ms": 80,
                "packet_loss_probability": 0.01, "bandwidth_limit_kbps": 2000}


@pytest.fixture
def host(tmp_path):
    return write_host_config(tmp_path)


@pytest.fixture
def daemon(host):
    with FakeDaemon(host.with_name("control.sock"), skins=("a", "b", "3g-average")) as fake:
        yield fake


def client(config, **kw) -> TestClient:
    return TestClient(create_app(load_host_config(config), **kw), raise_server_exceptions=False)


def error_of(response, status: int) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    return response.json()["error"]


def test_an_internal_daemon_error_is_500_with_the_error(host, daemon):
    daemon.internal.update({"status", "apply"})
    http = client(host)
    assert error_of(http.get("/vms"), 500) == "internal error: KeyError('uplink')"
    assert error_of(http.get("/vms/vm1"), 500) == "internal error: KeyError('uplink')"
    daemon.internal.discard("status")
    assert error_of(http.post("/vms/vm1/skins/3g-average"), 500) == "internal error: KeyError('uplink')"


def test_only_an_unreachable_daemon_is_503(host):
    http = client(host)
    message = error_of(http.get("/vms"), 503)
    assert "not running" in message and "netskin-interceptor.service" in message
    assert "not running" in error_of(http.post("/vms/vm1/rollback"), 503)


def test_a_refused_apply_is_422_with_the_vm_unchanged(host, daemon):
    http = client(host)
    assert http.post("/vms/vm2/skins/a").status_code == 200
    daemon.unenforceable.add("b")
    response = http.post("/vms/vm2/skins/b")
    assert "cannot be applied to vm2, nothing changed" in error_of(response, 422)
    assert response.json()["vm"]["active"] == "a"
    assert [r["cmd"] for r in daemon.requests if r["cmd"] != "status"] == ["apply", "apply"]


def test_a_rollback_with_problems_left_is_422(host, daemon):
    http = client(host)
    http.post("/vms/vm1/skins/a")
    http.post("/vms/vm1/skins/b")
    daemon.swap_problems = ["MTU reads back 1500, not 1400"]
    response = http.post("/vms/vm1/rollback")
    assert "MTU reads back 1500" in error_of(response, 422)
    assert response.json()["vm"]["verify_problems"] == ["MTU reads back 1500, not 1400"]


def test_an_apply_still_in_progress_at_the_bound_is_504_with_the_status(host, daemon):
    daemon.identity_seconds = 2.0
    response = client(host, timeout=0.5).post("/vms/vm1/skins/a")
    assert "still in progress" in error_of(response, 504)
    assert response.json()["vm"]["active"] == "a"


def test_a_late_answer_for_a_swap_that_happened_is_200(host, daemon):
    daemon.reply_delay = 1.5
    response = client(host, timeout=0.5).post("/vms/vm1/skins/a")
    assert response.status_code == 200 and response.json()["active"] == "a"


def test_the_seed_persona_without_a_name_gets_an_id(host):
    http = client(host)
    created = http.post("/personas/create", json=SEED_PERSONA)
    assert created.status_code == 201, created.text
    persona = created.json()
    assert re.fullmatch(r"persona-[0-9a-f]{6}", persona["id"])
    assert {key: persona[key] for key in SEED_PERSONA} == SEED_PERSONA
    assert http.get(f"/personas/get/{persona['id']}").json()["simulated_latency_ms"] == 80
    assert http.get(f"/skins/{persona['id']}").json()["origin"] == "drop-in"
    again = http.post("/personas/create", json=SEED_PERSONA).json()
    assert again["id"] != persona["id"]


def test_a_given_persona_id_or_name_wins(host):
    http = client(host)
    assert http.post("/personas/create", json=SEED_PERSONA | {"id": "mobile"}).json()["id"] == "mobile"
    assert http.post("/personas/create", json=SEED_PERSONA | {"name": "office"}).json()["id"] == "office"
    assert "already exists" in error_of(http.post("/personas/create", json=SEED_PERSONA | {"id": "mobile"}), 409)
    # A skin still needs its name: only personas get one made.
    assert "name" in error_of(http.post("/skins", json={"latency_ms": 1}), 400)
