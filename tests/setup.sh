#!/usr/bin/env bash
# Installs what the tests and the demo need on a Debian/Ubuntu machine, once:
# the Ruby stack for the Doorkeeper test server, Chromium for the browser tests,
# a virtualenv (.venv) with the Python packages of the script and the tests, and one of its own
# (.venv-dot) for the django-oauth-toolkit test server (its device grant needs oauthlib 3.x, the
# client is tested with what requirements.txt resolves to). Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

required=(ruby-rails ruby-doorkeeper ruby-sqlite3 ruby-webrick ruby-bcrypt tinyproxy)  # tinyproxy: the proxy tests
# The oidc-provider test server runs on Node.js; the machine's own (20.18 or later) is used where there is one.
command -v node >/dev/null && command -v npm >/dev/null || required+=(nodejs npm)
python3 -c 'import ensurepip' 2>/dev/null || required+=(python3-venv)
optional=()  # the browser tests need it; they are skipped without it (and fail under CI=true)
[[ "${FETCH_MEMOS_NO_BROWSER:-0}" == 1 ]] || optional+=(chromium)

missing() {
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || echo "$package"
  done
}
sudo=()
[[ "$(id -u)" == 0 ]] || sudo=(sudo)
mapfile -t need < <(missing "${required[@]}")
mapfile -t want < <(missing "${optional[@]}")
# Installed wherever the distribution has them: Debian 12 has both; Debian 13 has no Devise (the app then
# uses its built-in sign-in) and may lack the OpenID Connect gem (the OIDC profile's tests then say so, and
# fail under CI=true).
mapfile -t where_available < <(missing ruby-devise ruby-doorkeeper-openid-connect)
if ((${#need[@]} + ${#want[@]} + ${#where_available[@]})); then
  "${sudo[@]}" apt-get update -qq
fi
for package in "${where_available[@]}"; do
  if apt-cache show "$package" >/dev/null 2>&1; then
    need+=("$package")
  else
    echo "setup: $package is not in this distribution's archive; going on without it" >&2
  fi
done
if ((${#need[@]})); then
  echo "setup: installing Debian packages: ${need[*]}" >&2
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ((${#want[@]})); then
  echo "setup: installing Debian packages: ${want[*]}" >&2
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null \
    || echo "setup: could not install ${want[*]}; the browser tests will be skipped" >&2
fi

# The venvs are built with uv (tests/requirements-dev.txt has it; seconds where pip takes half a minute). uv is
# first installed into .venv with pip; where uv cannot install (no wheel for the machine, say), pip does it all.
venv_install() {  # venv_install VENV PIP-ARGS...: install into VENV with .venv's uv, else with VENV's own pip
  local venv=$1
  shift
  if [[ -x .venv/bin/uv ]] && .venv/bin/uv pip install -q --python "$venv/bin/python" "$@"; then
    return 0
  fi
  echo "setup: uv could not install into $venv; using pip" >&2
  "$venv/bin/python" -m ensurepip -q >/dev/null 2>&1 || true
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@"
}

if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv" >&2
  python3 -m venv .venv
fi
stamp=.venv/.requirements-stamp
if [[ ! -f "$stamp" ]] || ! cmp -s <(cat requirements.txt tests/requirements-dev.txt) "$stamp"; then
  echo "setup: installing Python packages into .venv" >&2
  [[ -x .venv/bin/uv ]] || .venv/bin/python -m pip install -q --disable-pip-version-check \
    "$(grep -E '^uv\b' tests/requirements-dev.txt | sed 's/ *#.*//')" || true
  venv_install .venv -r tests/requirements-dev.txt
  cat requirements.txt tests/requirements-dev.txt > "$stamp"
fi

if [[ ! -x .venv-dot/bin/python ]]; then
  echo "setup: creating .venv-dot (the django-oauth-toolkit test server)" >&2
  python3 -m venv --without-pip .venv-dot
fi
stamp=.venv-dot/.requirements-stamp
if [[ ! -f "$stamp" ]] || ! cmp -s tests/servers/requirements-dot.txt "$stamp"; then
  echo "setup: installing Python packages into .venv-dot" >&2
  venv_install .venv-dot -r tests/servers/requirements-dot.txt
  cp tests/servers/requirements-dot.txt "$stamp"
fi

# The oidc-provider test server's npm packages (tests/servers/package-lock.json), once per lock file.
node_ok=$(node -e 'const [a, b] = process.versions.node.split(".").map(Number); console.log(a > 20 || (a == 20 && b >= 18) ? 1 : 0)' 2>/dev/null || echo 0)
if [[ "$node_ok" != 1 ]]; then
  echo "setup: Node.js 20.18 or later is needed by the oidc-provider test server (found: $(node --version 2>/dev/null || echo none)); its tests will be skipped" >&2
else
  stamp=tests/servers/node_modules/.package-lock-stamp
  if [[ ! -f "$stamp" ]] || ! cmp -s tests/servers/package-lock.json "$stamp"; then
    echo "setup: installing the oidc-provider test server's npm packages" >&2
    (cd tests/servers && npm ci --no-audit --no-fund --loglevel=error >/dev/null) && cp tests/servers/package-lock.json "$stamp" \
      || echo "setup: npm ci failed in tests/servers; the oidc-provider tests will be skipped" >&2
  fi
fi
