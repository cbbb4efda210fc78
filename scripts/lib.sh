# Shared helpers for scripts/*: progress lines and the cache location.
# shellcheck shell=bash
VTDX_CACHE=${VTDX_CACHE:-$HOME/.cache/vtdx}
VTDX_VENV=$VTDX_CACHE/venv
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export VTDX_CACHE
step() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
