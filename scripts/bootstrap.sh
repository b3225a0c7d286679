#!/usr/bin/env bash
# Installs everything netskin and its tests need on Debian 12: system packages and a virtualenv in
# .venv with netskin (editable) and its test dependencies. Needs root (run as a user with sudo, it
# asks for it). Safe to run again: it only adds what is missing, and re-installs netskin into .venv
# when pyproject.toml changed since the last install.
set -euo pipefail
source "$(dirname "$0")/as-root.sh" "$@"
cd "$(dirname "$0")/.."

# gcc and the -dev packages build netfilterqueue from source (here and in the wheel test's fresh
# virtualenv); systemd gives systemd-analyze and vagrant `vagrant validate` for their unit tests.
# libvirt-dev and pkg-config build libvirt-python; libvirt-daemon (the daemons, with no service
# units: those are libvirt-daemon-system's, not installed), its QEMU driver and libvirt-clients
# (virsh) run the libvirt lab, which starts its own daemon in a directory of its own.
APT_PACKAGES=(
  iptables iproute2 libnetfilter-queue-dev libnetfilter-queue1 gcc python3 python3-dev python3-venv
  iperf3 dnsutils iputils-ping procps tmux systemd systemd-container vagrant qemu-system-x86
  etcd-server etcd-client cpio ipset
  libvirt-dev pkg-config libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # netskin's labs and tests run their own etcd (own data dir, ports, namespace); the packaged
  # service that Debian starts on install is not used, so it is stopped and disabled again.
  if [[ " ${missing[*]} " == *" etcd-server "* ]] && [ -d /run/systemd/system ]; then
    systemctl disable --now etcd.service >/dev/null 2>&1 || true
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PYTHON" -m venv .venv
fi
# The stamp holds the checksum of the pyproject.toml last installed (not its time: copies such as
# vagrant/provision.sh's rsync keep old modification times).
stamp=.venv/.netskin-installed
wanted=$(sha256sum pyproject.toml)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "bootstrap: installing netskin into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[test,libvirt]'
  echo "$wanted" >"$stamp"
fi
