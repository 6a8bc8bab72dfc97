#!/usr/bin/env bash
# The wheel as a user gets it: built from the tree, installed into fresh venvs outside it.
#   full: saisa-edge[export] runs make-checkpoint, export, run, calibrate (bundled data), validate
#   lean: saisa-edge alone (no torch, no transformers) runs the artifact and gives the same tokens
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip wheel -q --no-deps -w "$work/dist" "$root"
wheel=$(ls "$work"/dist/saisa_edge-*.whl)

python3 -m venv "$work/full"
"$work/full/bin/python" -m pip install -q torch==2.13.0
"$work/full/bin/python" -m pip install -q "$wheel[export]"
python3 -m venv "$work/lean"
"$work/lean/bin/python" -m pip install -q "$wheel"

cd "$work"  # no source tree on sys.path from here on
full=(env PYTHONPATH= "$work/full/bin/saisa-edge")
lean=(env PYTHONPATH= "$work/lean/bin/saisa-edge")
image=$("$work/full/bin/python" -c "from saisa_edge.inputs.image import DEMO_IMAGE; print(DEMO_IMAGE)")
case "$image" in "$root"/*) echo "wheel_smoke: the demo image came from the source tree ($image)"; exit 1;; esac

"${full[@]}" make-checkpoint --preset tiny -o ckpt
"${full[@]}" export ckpt -o art
ask=(--image "$image" --prompt "What is in the picture?" --max-new-tokens 8 --json)
"${full[@]}" run art "${ask[@]}" > full.json
"${full[@]}" calibrate art -o art-int8 --precision int8 --samples 2 --report-samples 0
"${full[@]}" validate art --samples 2 > validate.txt

if "$work/lean/bin/python" -c "import torch" 2>/dev/null || "$work/lean/bin/python" -c "import transformers" 2>/dev/null; then
    echo "wheel_smoke: the lean install pulled torch or transformers"; exit 1
fi
"${lean[@]}" --help > /dev/null
"${lean[@]}" run art "${ask[@]}" > lean.json
"$work/lean/bin/python" - <<'PY'
import json
full, lean = (json.load(open(f)) for f in ("full.json", "lean.json"))
assert full["tokens"] and full["tokens"] == lean["tokens"], (full["tokens"], lean["tokens"])
print(f"wheel_smoke: ok ({len(full['tokens'])} tokens, same with and without torch)")
PY
