#!/usr/bin/env bash
# Set up and run mailwarden on its default config (./config.toml) on a fresh
# Debian machine:   ./scripts/run.sh
# Installs Debian packages (needs root or sudo), creates .venv, makes sure a
# clamd answers at the configured socket, creates the store, then runs
# `mailwarden serve` in the foreground (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${MAILWARDEN_CONFIG:-$PWD/config.toml}

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PACKAGES=(python3 python3-venv python3-dev gcc libmagic1 clamav-daemon clamav-freshclam
          clamav-testfiles swaks)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo ">> installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  echo ">> creating .venv"
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q -e .

# Values from the config (validated first: a bad config stops here, exit 2).
.venv/bin/python -m cli --config "$CONFIG" check >/dev/null 2>&1 || true
read -r CLAMD_ADDR STORE_PATH < <(.venv/bin/python - "$CONFIG" <<'PY'
import sys
from gateway.config import load_config, ConfigError
try:
    c = load_config(sys.argv[1])
except ConfigError as e:
    print(e, file=sys.stderr); sys.exit(2)
print(c.filter_settings("clamav").address if "clamav" in c.chain else "-", c.store.path)
PY
)

clamd_ping() {
  .venv/bin/python - "$1" <<'PY'
import socket, sys
addr = sys.argv[1]
try:
    if "/" in addr:
        s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(addr)
    else:
        h, p = addr.rsplit(":", 1); s = socket.create_connection((h, int(p)), 2)
    s.sendall(b"nPING\n"); ok = s.recv(16) == b"PONG\n"
except OSError:
    ok = False
sys.exit(0 if ok else 1)
PY
}

if [ "$CLAMD_ADDR" != "-" ] && ! clamd_ping "$CLAMD_ADDR"; then
  echo ">> no clamd answers at $CLAMD_ADDR: starting Debian's clamd"
  DBDIR=/var/lib/clamav
  if ! ls $DBDIR/*.c[lv]d >/dev/null 2>&1; then
    echo ">> fetching real signatures with freshclam (bounded to 5 minutes)"
    $SUDO timeout 300 freshclam --quiet || true
  fi
  if ! ls $DBDIR/*.c[lv]d $DBDIR/*.ndb $DBDIR/*.hdb >/dev/null 2>&1; then
    echo "!! ======================================================================"
    echo "!! freshclam could not fetch signatures (no internet?)."
    echo "!! Installing the OFFLINE TEST signatures only (EICAR and Debian's"
    echo "!! clamav-testfiles): this clamd will NOT detect real viruses."
    echo "!! Run freshclam when the network allows."
    echo "!! ======================================================================"
    $SUDO .venv/bin/python -c "from pathlib import Path; from tests.support.clamd import build_database; build_database(Path('$DBDIR'))"
    $SUDO chown -R clamav:clamav $DBDIR 2>/dev/null || true
  fi
  $SUDO install -d -o clamav -g clamav /run/clamav
  if command -v systemctl >/dev/null 2>&1 && systemctl is-system-running >/dev/null 2>&1; then
    $SUDO systemctl restart clamav-daemon
  else
    $SUDO /usr/sbin/clamd
  fi
  for _ in $(seq 1 120); do clamd_ping "$CLAMD_ADDR" && break; sleep 1; done
  clamd_ping "$CLAMD_ADDR" || { echo "clamd did not come up at $CLAMD_ADDR" >&2; exit 1; }
fi

if [ ! -d "$STORE_PATH" ] || [ ! -w "$STORE_PATH" ]; then
  echo ">> creating the store at $STORE_PATH"
  $SUDO install -d -m 0700 -o "$(id -u)" -g "$(id -g)" "$STORE_PATH"
fi

.venv/bin/python -m cli --config "$CONFIG" check || \
  echo ">> (a failing next hop check is expected until your MTA listens there)"
echo ">> mailwarden serve --config $CONFIG"
exec .venv/bin/mailwarden --config "$CONFIG" serve
