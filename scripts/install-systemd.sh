#!/usr/bin/env bash
# make install-systemd: install the units with the path of this checkout's
# evscrypt, then reload systemd.  Enable with: systemctl enable --now evscrypt
set -euo pipefail
cd "$(dirname "$0")/.."
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
BIN=$(readlink -f .venv/bin/evscrypt)
install -d "$UNIT_DIR"
for unit in systemd/evscrypt.service systemd/evscrypt-attach@.service; do
    sed "s|@EVSCRYPT@|$BIN|g" "$unit" > "$UNIT_DIR/$(basename "$unit")"
    chmod 0644 "$UNIT_DIR/$(basename "$unit")"
    echo "installed $UNIT_DIR/$(basename "$unit")"
done
if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
fi
