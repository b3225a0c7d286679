# Sourced first by the scripts that need root (apt-get, network namespaces, iptables, NFQUEUE):
# as root it does nothing; otherwise it runs the calling script again with sudo, keeping the
# NETSKIN_* and PYTHON variables, or stops with the reason when there is no sudo.
# Usage, at the top of a script: source "$(dirname "$0")/as-root.sh" "$@"
if [ "$(id -u)" -ne 0 ]; then
  _netskin_script=$(readlink -f "$0")
  if command -v sudo >/dev/null 2>&1; then
    _netskin_keep=()
    for _netskin_name in $(compgen -e); do
      case $_netskin_name in
        NETSKIN_* | PYTHON) _netskin_keep+=("$_netskin_name=${!_netskin_name}") ;;
      esac
    done
    echo "${_netskin_script##*/}: needs root; running it again with sudo" >&2
    exec sudo -- env "${_netskin_keep[@]}" bash "$_netskin_script" "$@"
  fi
  echo "${_netskin_script##*/}: needs root (apt-get, network namespaces, iptables) and sudo is not installed;" \
    "run it as root: su -c 'bash $_netskin_script'" >&2
  exit 1
fi
