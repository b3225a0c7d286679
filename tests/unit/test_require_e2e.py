"""NETSKIN_REQUIRE_E2E=1 (CI) turns a skipped end-to-end test into a failure: a small suite with
tests/conftest.py as its conftest runs without and with the switch."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

E2E_MODULE = """
import pytest

def test_skips_in_the_test():
    pytest.skip("no network namespaces here")

@pytest.mark.skipif(True, reason="no iptables here")
def test_skipped_by_a_marker():
    pass

def test_runs():
    pass
"""

UNIT_MODULE = """
import pytest

def test_plain_unit_skip():
    pytest.skip("an optional tool is missing")

@pytest.mark.e2e
def test_marked_e2e_outside_the_e2e_directory():
    pytest.skip("marked end-to-end")

@pytest.mark.e2e
@pytest.mark.xfail(reason="a known failure", strict=True)
def test_expected_failure():
    assert False
"""


@pytest.fixture
def inner_suite(pytester):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makeini("[pytest]\nmarkers =\n    e2e: end-to-end\n")
    (pytester.mkdir("e2e") / "test_inner_e2e.py").write_text(E2E_MODULE)
    pytester.makepyfile(test_inner_unit=UNIT_MODULE)
    return pytester


def test_without_the_switch_skips_are_skips(inner_suite, monkeypatch):
    monkeypatch.delenv("NETSKIN_REQUIRE_E2E", raising=False)
    result = inner_suite.runpytest("-rA")
    result.assert_outcomes(passed=1, skipped=4, xfailed=1)


def test_with_the_switch_a_skipped_e2e_test_fails_with_its_reason(inner_suite, monkeypatch):
    monkeypatch.setenv("NETSKIN_REQUIRE_E2E", "1")
    result = inner_suite.runpytest("-rA")
    # pytest.skip() in the test body fails the test; a skip marker acts in setup, so it is an error.
    result.assert_outcomes(passed=1, failed=2, errors=1, skipped=1, xfailed=1)
    assert result.ret != 0
    text = result.stdout.str()
    for reason in ("no network namespaces here", "no iptables here", "marked end-to-end"):
        assert reason in text, text
    assert "NETSKIN_REQUIRE_E2E=1 requires every end-to-end test to run" in text
    # A unit test's skip stays a skip: the switch is about end-to-end tests only.
    assert "SKIPPED [1] test_inner_unit.py" in text and "an optional tool is missing" in text


def test_with_the_switch_a_skipped_e2e_module_fails_the_run(inner_suite, monkeypatch):
    (inner_suite.path / "e2e" / "test_inner_module.py").write_text(
        'import pytest\npytest.skip("no NFQUEUE here", allow_module_level=True)\n'
    )
    monkeypatch.delenv("NETSKIN_REQUIRE_E2E", raising=False)
    inner_suite.runpytest().assert_outcomes(passed=1, skipped=5, xfailed=1)

    monkeypatch.setenv("NETSKIN_REQUIRE_E2E", "1")
    result = inner_suite.runpytest()
    assert result.ret != 0
    assert "no NFQUEUE here" in result.stdout.str()
    assert result.parseoutcomes().get("errors", 0) >= 1


def test_tests_under_e2e_are_marked(inner_suite, monkeypatch):
    monkeypatch.delenv("NETSKIN_REQUIRE_E2E", raising=False)
    result = inner_suite.runpytest("-m", "e2e", "--collect-only", "-q")
    collected = [line for line in result.stdout.lines if "::" in line]
    assert sorted(collected) == sorted([
        "e2e/test_inner_e2e.py::test_skips_in_the_test",
        "e2e/test_inner_e2e.py::test_skipped_by_a_marker",
        "e2e/test_inner_e2e.py::test_runs",
        "test_inner_unit.py::test_marked_e2e_outside_the_e2e_directory",
        "test_inner_unit.py::test_expected_failure",
    ]), result.stdout.str()
