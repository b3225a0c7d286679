"""Shared fixtures: the demo lab in network namespaces, built per test or per module.

Each lab gets a unique prefix so parallel and leftover runs never collide, and is removed by a
finalizer registered before it is built, so a failed build or test still leaves nothing behind.

Every test under tests/e2e is marked ``e2e``. With NETSKIN_REQUIRE_E2E=1 (CI) a skipped e2e test
fails instead, with the skip's reason, so a host that cannot run them cannot pass for green.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import pytest

LAB_TOOLS = ("ip", "iptables", "sysctl", "ping", "dig", "iperf3")
E2E_DIR = Path(__file__).resolve().parent / "e2e"
REQUIRE_E2E_ENV = "NETSKIN_REQUIRE_E2E"


def e2e_required() -> bool:
    return os.environ.get(REQUIRE_E2E_ENV) == "1"


def _under_e2e_dir(path: Path) -> bool:
    return E2E_DIR in Path(path).resolve().parents


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _under_e2e_dir(item.path) and item.get_closest_marker("e2e") is None:
            item.add_marker(pytest.mark.e2e)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return longrepr[2]
    return str(longrepr)


def _fail_the_skip(report, what: str) -> None:
    report.outcome = "failed"
    report.longrepr = (
        f"{what} was skipped, but {REQUIRE_E2E_ENV}=1 requires every end-to-end test to run: "
        f"{_skip_reason(report)}"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    # An xfail is reported as skipped too; it ran, so it is not what the switch is about.
    if report.skipped and not hasattr(report, "wasxfail") and e2e_required() and item.get_closest_marker("e2e"):
        _fail_the_skip(report, f"end-to-end test {item.nodeid}")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    # A whole e2e module can skip while it is collected (pytest.importorskip, a module-level skip).
    report = yield
    if report.skipped and e2e_required() and _under_e2e_dir(collector.path):
        _fail_the_skip(report, f"end-to-end module {collector.nodeid}")
    return report


def lab_skip_reason() -> str | None:
    """Why the lab cannot be built on this host, or None."""
    if os.geteuid() != 0:
        return "the namespace lab needs root (network namespaces, veth, /etc/netns)"
    missing = [tool for tool in LAB_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"the namespace lab needs {', '.join(missing)} on PATH (apt-get install iproute2 iptables iputils-ping dnsutils iperf3)"
    return None


def unique_lab_prefix() -> str:
    # Short on purpose: namespace names are prefix + "-inet" / "-vm12".
    return f"nsk{os.getpid() % 10000}{secrets.token_hex(2)[:3]}"


def _build_lab(request: pytest.FixtureRequest, vms: int = 2):
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    from manager.lab import lab_down, lab_up

    prefix = unique_lab_prefix()
    request.addfinalizer(lambda: lab_down(prefix))
    return lab_up(prefix, vms=vms)


@pytest.fixture
def lab(request):
    """A fresh two-VM lab for one test."""
    return _build_lab(request)


@pytest.fixture(scope="module")
def lab_module(request):
    """A two-VM lab shared by the tests of one module; tests must leave it as they found it."""
    return _build_lab(request)


@pytest.fixture
def lab_prefix(request):
    """A unique lab prefix with nothing built yet; whatever the test builds under it is removed."""
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    from manager.lab import lab_down

    prefix = unique_lab_prefix()
    request.addfinalizer(lambda: lab_down(prefix))
    return prefix


@pytest.fixture
def skins(lab):
    """Write skins into the lab's drop-in directory; the files are removed afterwards. (A module
    that overrides ``lab``, e.g. with its module-wide lab, gets its skins written there.)"""
    import json

    from interceptor.schema import load_host_config

    skins_dir = load_host_config(lab.config_path).skins_dir
    written = []

    def write(name: str, **fields) -> str:
        path = skins_dir / f"{name}.json"
        path.write_text(json.dumps({"name": name, **fields}))
        written.append(path)
        return name

    yield write
    for path in written:
        path.unlink(missing_ok=True)
