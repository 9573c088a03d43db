#!/usr/bin/env bash
# Install what cropflow needs on a Debian machine, only what is missing, so a second run takes a second.
#   1. Debian packages: PostgreSQL 15 + PostGIS 3 (the local STAC API), python3-venv; chromium (headless, for the
#      test of the Prefect UI) when run as root, else a note (that test skips without it).
#   2. Azurite (Azure Storage's emulator, an npm package) in .venv/azurite, for the tests of az:// locations; Node.js
#      and npm from Debian when run as root and npm is missing, else a note (those tests skip without it).
#   3. .venv with torch==2.13.0 installed first and alone (CPU wheel), then every pin in requirements.lock.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
APT_PACKAGES=(postgresql-15 postgresql-15-postgis-3 postgresql-client-15)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
$PY -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
if ! dpkg -s chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    missing+=(chromium)
  else
    echo "cropflow setup: note: Debian package chromium is missing; the Prefect UI test will skip ('sudo apt-get install chromium')." >&2
  fi
fi
if ! command -v npm >/dev/null 2>&1; then  # not `dpkg -s npm`: NodeSource's nodejs ships npm without that package
  if [ "$(id -u)" = 0 ]; then
    missing+=(nodejs npm)
  else
    echo "cropflow setup: note: npm is missing; the tests of az:// locations will skip ('sudo apt-get install nodejs npm')." >&2
  fi
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "cropflow setup: missing Debian packages: ${missing[*]}; run 'sudo apt-get install ${missing[*]}' and retry." >&2
    exit 1
  fi
  echo "cropflow setup: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

AZURITE_VERSION=3.35.0  # the last release that runs on Node.js 20 (3.36 needs 21)
if command -v npm >/dev/null 2>&1 &&
  ! grep -qs "\"version\": \"$AZURITE_VERSION\"" .venv/azurite/node_modules/azurite/package.json; then
  echo "cropflow setup: installing azurite@$AZURITE_VERSION (npm) in .venv/azurite"
  npm install --prefix .venv/azurite --no-audit --no-fund --save-exact --loglevel=error "azurite@$AZURITE_VERSION" >/dev/null
fi

stamp=.venv/.cropflow-installed
want=$(cat pyproject.toml requirements.lock infra/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || $PY -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -c requirements.lock -e ".[dev,bench]"
echo "$want" > "$stamp"
echo "cropflow setup: environment ready in .venv"
