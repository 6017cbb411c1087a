#!/usr/bin/env bash
# A scripted end-to-end run of `flashtune agent run`: a local page, a fake UI-TARS server that replays
# script.json, and the agent in headless Chromium (or on Xvfb with EXECUTOR=x11). Everything stays on 127.0.0.1.
# Usage: examples/agent/run_demo.sh [OUT_DIR]      (from the repository root, with the venv's flashtune on PATH)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-agent_runs/demo}"
executor="${EXECUTOR:-browser}"
page_port="${PAGE_PORT:-8765}"
model_port="${MODEL_PORT:-8766}"
python3 -m http.server "$page_port" --bind 127.0.0.1 --directory "$here" >/dev/null 2>&1 &
page_pid=$!
flashtune agent fake-server --script "$here/script.json" --port "$model_port" &
model_pid=$!
trap 'kill $page_pid $model_pid 2>/dev/null || true' EXIT
sleep 1
flashtune agent run --task "Subscribe to the newsletter as Ada" \
  --endpoint "http://127.0.0.1:$model_port/v1" --executor "$executor" \
  --start-url "http://127.0.0.1:$page_port/page.html" --size 1280x720 --max-steps 6 --out "$out"
