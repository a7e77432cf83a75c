#!/usr/bin/env bash
# Set up llama-sae in ./.venv (created on first use, reused after): installs torch 2.13.0 (CPU build)
# only when the venv cannot import torch, then the package with its dev extra. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
stamp=.venv/.llama-sae-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
# Browser tests of the UI and dashboard: Debian's chromium + chromium-driver, installed only when missing and
# apt-get is there (as root, or through passwordless sudo); without them those tests skip with the reason.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then as_root=""; elif sudo -n true 2>/dev/null; then as_root="sudo -n"; else as_root=none; fi
  if [ "$as_root" != none ]; then
    { $as_root apt-get update -qq && $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
        chromium-driver >/dev/null; } || echo "note: could not install chromium; the browser tests will skip"
  fi
fi
