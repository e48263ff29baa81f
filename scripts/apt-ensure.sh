# Sourced by install.sh and bench.sh: install the Debian packages that are
# missing, as root; as another user, only say which are missing.
#   apt_ensure LABEL PACKAGE...
apt_ensure() {
    local label=$1 p missing=()
    shift
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    if [[ $(id -u) -eq 0 ]]; then
        echo "$label: apt packages: ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "$label: missing apt packages (run as root to install${APT_ENSURE_NOTE:+; $APT_ENSURE_NOTE}): ${missing[*]}" >&2
    fi
}
