"""The Vagrant lab: the Vagrantfile validates, and provision.sh is valid bash that sets netskin up
the README's way (scripts/bootstrap.sh) and installs what the systemd units expect."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VAGRANT = REPO / "vagrant"
PROVISION = VAGRANT / "provision.sh"


def code_lines(path: Path) -> list[str]:
    """The script's lines without comments (good enough for the checks below: no heredoc has '#')."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].rstrip()
        if line.strip() and not line.lstrip().startswith("#"):
            lines.append(line)
    return lines


def test_provision_script_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(PROVISION)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_provision_script_fails_fast():
    assert "set -euo pipefail" in code_lines(PROVISION)


def test_provision_runs_the_repository_bootstrap():
    runs = [line for line in code_lines(PROVISION) if re.search(r"\bbash\s+\S*scripts/bootstrap\.sh\b", line)]
    assert runs, "provision.sh must run the repository's scripts/bootstrap.sh (the README's set-up)"
    assert (REPO / "scripts" / "bootstrap.sh").is_file()


def test_provision_links_the_tools_the_units_run():
    text = "\n".join(code_lines(PROVISION))
    units = "\n".join(p.read_text() for p in (REPO / "systemd").glob("*.service"))
    for tool in ("netskin", "netskin-interceptor"):
        assert f"/usr/local/bin/{tool} " in units
    assert re.search(r'for tool in netskin netskin-interceptor; do\s+ln -sfn "\$PREFIX/\.venv/bin/\$tool" "\$BIN/\$tool"', text)
    assert "BIN=/usr/local/bin" in text
    assert '"$PREFIX"/systemd/*.service "$PREFIX"/systemd/*.path' in text


def test_vagrantfile_names_a_debian_12_box_and_both_providers():
    text = (VAGRANT / "Vagrantfile").read_text()
    assert re.search(r'config\.vm\.box\s*=\s*"debian/bookworm64"', text)
    assert "provider :libvirt" in text and "provider :virtualbox" in text
    assert 'path: "provision.sh"' in text


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant is not installed (apt-get install vagrant)")
def test_vagrant_validate(tmp_path):
    # No provider (libvirt, VirtualBox) is needed to validate the configuration itself; Vagrant's
    # state and home go to tmp_path so the checkout stays clean, and it makes no network calls.
    env = {**os.environ, "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"), "VAGRANT_HOME": str(tmp_path / "home"),
           "VAGRANT_CHECKPOINT_DISABLE": "1", "VAGRANT_NO_COLOR": "1"}
    done = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=VAGRANT, env=env,
                          capture_output=True, text=True, timeout=180)
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "validated successfully" in done.stdout
    assert not (VAGRANT / ".vagrant").exists()
