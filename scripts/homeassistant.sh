#!/usr/bin/env bash
# Installs Home Assistant Core into .deps/homeassistant/ (a Python virtual environment), for the
# test against a real Home Assistant (tests/homeassistant.rs). Idempotent: nothing is done when
# the pinned version is already there, so CI pays the install (about two minutes) once.
#   HA_VERSION   the Home Assistant Core release (default below)
#   HA_PYTHON    the Python 3.13 to make the environment with (default: python3.13, then python3,
#                whichever on PATH is 3.13, then a pyenv-built 3.13)
set -euo pipefail
cd "$(dirname "$0")/.."

HA_VERSION="${HA_VERSION:-2025.4.4}"
VENV=.deps/homeassistant
# The integrations the test's Home Assistant loads besides its defaults; their requirements (and
# the defaults') are installed now, so that it starts with --skip-pip and never reaches out to
# the network while a test runs.
INTEGRATIONS="onboarding api config websocket_api auth http mqtt"

say() { printf '\033[1m[homeassistant]\033[0m %s\n' "$*"; }

if [ -f "$VENV/.installed-$HA_VERSION" ]; then
  say "Home Assistant $HA_VERSION is installed in $VENV"
  exit 0
fi
python=""
# A pyenv-built 3.13, where the machine has one, comes after those on PATH.
pyenv_313=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.13*/bin/python3.13 2>/dev/null | tail -n 1 || true)
for candidate in "${HA_PYTHON:-}" python3.13 python3 "$pyenv_313"; do
  [ -n "$candidate" ] || continue
  if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 13))' 2>/dev/null; then
    python="$candidate"
    break
  fi
done
if [ -z "$python" ]; then
  say "Home Assistant $HA_VERSION needs Python 3.13: set HA_PYTHON to its path" >&2
  exit 1
fi
say "installing Home Assistant $HA_VERSION into $VENV (a few minutes)"
rm -rf "$VENV"
"$python" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "homeassistant==$HA_VERSION"
# The requirements, read from the manifests of those integrations and of their dependencies.
mapfile -t requirements < <("$VENV/bin/python" - $INTEGRATIONS <<'PY'
import json, pathlib, sys
import homeassistant.bootstrap as bootstrap
import homeassistant.components as components

root = pathlib.Path(components.__file__).parent
todo = set(sys.argv[1:]) | bootstrap.CORE_INTEGRATIONS | bootstrap.DEFAULT_INTEGRATIONS
todo |= bootstrap.LOGGING_AND_HTTP_DEPS_INTEGRATIONS | bootstrap.FRONTEND_INTEGRATIONS
seen, requirements = set(), set()
while todo:
    domain = todo.pop()
    if domain in seen:
        continue
    seen.add(domain)
    manifest = json.loads((root / domain / "manifest.json").read_text())
    requirements.update(manifest.get("requirements", []))
    todo.update(manifest.get("dependencies", []))
print("\n".join(sorted(requirements)))
PY
)
"$VENV/bin/pip" install -q "${requirements[@]}"
touch "$VENV/.installed-$HA_VERSION"
say "ready: $VENV/bin/hass"
