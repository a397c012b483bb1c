#!/usr/bin/env bash
# Installs what the tests and the demo need on a Debian/Ubuntu machine, once:
# the Ruby stack for the Doorkeeper test server, Chromium for the browser tests,
# and a virtualenv (.venv) with the Python packages. Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(ruby-rails ruby-devise ruby-doorkeeper ruby-sqlite3 ruby-webrick)
if [[ "${FETCH_MEMOS_NO_BROWSER:-0}" != 1 ]]; then
  apt_packages+=(chromium)
fi
python3 -c 'import ensurepip' 2>/dev/null || apt_packages+=(python3-venv)

missing=()
for package in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  sudo=()
  [[ "$(id -u)" == 0 ]] || sudo=(sudo)
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv" >&2
  python3 -m venv .venv
fi
stamp=.venv/.requirements-stamp
if [[ ! -f "$stamp" ]] || ! cmp -s <(cat requirements.txt tests/requirements-dev.txt) "$stamp"; then
  echo "setup: installing Python packages into .venv" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -r tests/requirements-dev.txt
  cat requirements.txt tests/requirements-dev.txt > "$stamp"
fi
