#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine, then run it.
#   ./scripts/test.sh [pytest args...]
# Installs Debian packages (needs root or sudo), creates .venv, installs
# mailwarden with its test extras, checks ruff, and runs the whole suite
# against real parts: clamd, a loopback DNS server, Postfix, swaks.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PACKAGES=(python3 python3-venv python3-dev gcc libmagic1 clamav-daemon clamav-testfiles
          postfix swaks faketime curl systemd openssl
          postgresql passwd util-linux)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo ">> installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  # Postfix must not configure or start a system mail server: the tests run
  # their own private instance.
  echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Debian starts clamav-freshclam/clamav-daemon services on install; the suite
# runs its own clamd with an offline signature database instead.

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo ">> creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test]'

echo ">> ruff"
.venv/bin/ruff check .

echo ">> pytest"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
