"""A runtime-only install: export-side commands say in one line which extra to install."""

from __future__ import annotations

import json
import subprocess
import sys

# Makes the export extra's libraries unimportable, then runs each command line given as JSON.
_BLOCKED = """
import contextlib, io, json, sys
for name in ("torch", "onnx", "transformers"):
    sys.modules[name] = None
from saisa_edge.cli import main
results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as e:
            results.append([e.code, err.getvalue()])
print(json.dumps(results))
"""
EXPORT_SIDE = [
    ["export", "{ckpt}", "-o", "{tmp}/art"],
    ["calibrate", "{ckpt}", "-o", "{tmp}/q", "--precision", "int8"],
    ["validate", "{ckpt}"],
    ["make-checkpoint", "--preset", "tiny", "-o", "{tmp}/c"],
    ["flops", "{ckpt}"],
    ["bench", "{ckpt}", "--backend", "torch"],
    ["run", "{ckpt}", "--prompt", "hi"],
]


def test_export_side_commands_name_the_extra(tiny_dir, tmp_path):
    commands = [[a.format(ckpt=tiny_dir, tmp=tmp_path) for a in c] for c in EXPORT_SIDE]
    commands.append(["flops", "--config", "vicuna-7b"])  # runtime side: runs
    r = subprocess.run([sys.executable, "-c", _BLOCKED, json.dumps(commands)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for command, (code, err) in zip(commands[:-1], results[:-1]):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (command, err)
        assert "needs torch, onnx, transformers" in lines[0] and "pip install 'saisa-edge[export]'" in lines[0], lines[0]
    assert results[-1][0] == 0 and "saisa-edge[export]" not in results[-1][1]
    assert not any(tmp_path.iterdir())
