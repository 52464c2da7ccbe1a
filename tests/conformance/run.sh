#!/usr/bin/env bash
# Runs Gymnasium's own vector test suite against FarmVectorEnv (../shared/conformance, beside
# this checkout), less the tests listed in deselected.txt. Usage: tests/conformance/run.sh [PYTHON]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
suite="$here/../../../shared/conformance/gymnasium-vector.sh"
[ -f "$suite" ] || { echo "no conformance suite at $suite: skipped"; exit 0; }
deselect=()
while read -r id _; do
    deselect+=(--deselect "$id")
done < <(grep -v '^#' "$here/deselected.txt" | grep -v '^\s*$')
exec bash "$suite" "${1:-python3}" -p no:randomly "${deselect[@]}"
