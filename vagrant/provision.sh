#!/usr/bin/env bash
# Provisions the netskin demo lab on Debian 12 (run as root; `vagrant up` does).
#
#   1. copies the repository to /opt/netskin and runs its scripts/bootstrap.sh there: the same
#      apt packages and .venv as the README's set-up (the synced folder stays untouched);
#   2. links /usr/local/bin/netskin and /usr/local/bin/netskin-interceptor into that .venv;
#   3. installs the systemd units of systemd/ and a host configuration for a two-VM namespace
#      lab (netskin-lab.service builds it at boot; the interceptor enters its hypervisor
#      namespace), and starts them;
#   4. runs `netskin demo` once, so the provisioning output shows a skin's measured effect.
#
# Safe to run again (`vagrant provision`): it updates the copy, keeps the .venv, and never
# overwrites an /etc/netskin/netskin.toml it did not write.
# Environment: NETSKIN_SRC (default /vagrant), NETSKIN_PREFIX (default /opt/netskin),
# NETSKIN_LAB_VMS (default 2), NETSKIN_SKIP_DEMO=1 to skip step 4.
set -euo pipefail

SRC=${NETSKIN_SRC:-/vagrant}
PREFIX=${NETSKIN_PREFIX:-/opt/netskin}
LAB_VMS=${NETSKIN_LAB_VMS:-2}
LAB=nsk                     # namespaces nsk-hv, nsk-inet, nsk-vm1.. (README's "Using it")
BIN=/usr/local/bin
UNITS=/etc/systemd/system
CONFIG=/etc/netskin/netskin.toml
MARK="# written by vagrant/provision.sh"

say() { printf '\n==> %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "provision.sh: run as root (sudo bash vagrant/provision.sh)" >&2
  exit 1
fi
if [ ! -f "$SRC/pyproject.toml" ] || [ ! -f "$SRC/scripts/bootstrap.sh" ]; then
  echo "provision.sh: $SRC is not a netskin checkout; set NETSKIN_SRC to the repository" >&2
  exit 1
fi

say "copying $SRC to $PREFIX"
export DEBIAN_FRONTEND=noninteractive
if ! command -v rsync >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends rsync >/dev/null
fi
mkdir -p "$PREFIX"
# The synced folder may hold the host's own .venv, caches and egg-info: none of it belongs here.
rsync -a --delete \
  --exclude=/.venv/ --exclude=/.git/ --exclude=/.vagrant/ --exclude=/vagrant/.vagrant/ \
  --exclude=__pycache__/ --exclude='*.egg-info/' --exclude=.pytest_cache/ --exclude=.hypothesis/ \
  "$SRC/" "$PREFIX/"

say "scripts/bootstrap.sh (apt packages, $PREFIX/.venv with netskin)"
# Debian's python3: the unit's ProtectHome=yes would hide an interpreter under /root or /home.
PYTHON=/usr/bin/python3 bash "$PREFIX/scripts/bootstrap.sh"

say "linking $BIN/netskin and $BIN/netskin-interceptor"
for tool in netskin netskin-interceptor; do
  ln -sfn "$PREFIX/.venv/bin/$tool" "$BIN/$tool"
done

say "installing the systemd units"
install -m 0644 "$PREFIX"/systemd/*.service "$PREFIX"/systemd/*.path "$UNITS/"

# The lab: rebuilt at every boot (it lives in /run), before the interceptor starts.
cat > "$UNITS/netskin-lab.service" <<EOF
$MARK
[Unit]
Description=netskin namespace lab $LAB ($LAB_VMS VMs behind $LAB-hv, internet in $LAB-inet)
Before=netskin-interceptor.service

[Service]
Type=oneshot
RemainAfterExit=yes
# Leftovers of an unclean shutdown first; the lab's sinks stay running in this unit.
ExecStartPre=-$BIN/netskin lab down --prefix $LAB
ExecStart=$BIN/netskin lab up --vms $LAB_VMS --prefix $LAB
ExecStop=$BIN/netskin lab down --prefix $LAB

[Install]
WantedBy=multi-user.target
EOF

# The interceptor runs inside the lab's hypervisor namespace (host_netns): setns() needs
# CAP_SYS_ADMIN and a namespace filter that allows entering a network namespace.
mkdir -p "$UNITS/netskin-interceptor.service.d"
cat > "$UNITS/netskin-interceptor.service.d/lab.conf" <<EOF
$MARK
[Unit]
Requires=netskin-lab.service
After=netskin-lab.service

[Service]
CapabilityBoundingSet=CAP_SYS_ADMIN
RestrictNamespaces=net
EOF

systemctl daemon-reload
systemctl enable netskin-lab.service >/dev/null
systemctl restart netskin-lab.service

say "host configuration $CONFIG"
mkdir -p /etc/netskin/skins.d
if [ ! -f "$CONFIG" ] || head -n1 "$CONFIG" | grep -qF "$MARK"; then
  # The lab's own config, with netskin's default state_dir, skins_dir and control socket, so
  # `netskin` finds the daemon without --config.
  {
    echo "$MARK: the namespace lab $LAB (netskin-lab.service)"
    grep -Ev '^(#|state_dir|skins_dir|control_socket) ' "/run/netskin-lab/$LAB/netskin.toml"
  } > "$CONFIG.tmp"
  mv "$CONFIG.tmp" "$CONFIG"
else
  echo "keeping $CONFIG (not written by provision.sh)"
fi

say "starting netskin-interceptor.service and netskin-skins.path"
systemctl enable netskin-interceptor.service netskin-skins.path >/dev/null
systemctl restart netskin-interceptor.service
systemctl start netskin-skins.path
# The REST API unit is installed; it is enabled only when this netskin has `netskin serve`.
if "$BIN/netskin" serve --help >/dev/null 2>&1; then
  systemctl enable --now netskin-api.service >/dev/null
fi
for _ in $(seq 50); do  # the control socket appears once the daemon is ready
  [ -S /run/netskin/control.sock ] && break
  sleep 0.2
done
"$BIN/netskin" status

if [ "${NETSKIN_SKIP_DEMO:-0}" != 1 ]; then
  say "netskin demo"
  "$BIN/netskin" demo
fi

cat <<EOF

netskin is installed in $PREFIX. Try:
  vagrant ssh -c 'sudo netskin demo'
  vagrant ssh -c 'sudo netskin apply vm1 comcast-3g && sudo ip netns exec $LAB-vm1 ping -c 5 10.77.0.2'
  vagrant ssh -c 'sudo netskin status; sudo netskin revert vm1'
EOF
