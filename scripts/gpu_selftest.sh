#!/usr/bin/env bash
# Everything GPU-bound this project can check, on a machine with an NVIDIA GPU. Every check
# runs even when an earlier one fails; a summary at the end lists them, and the exit status
# is 1 if any failed.
#  1. the NAAViT Triton kernel against its PyTorch reference on the device (fp32/fp16/bf16),
#     and its timing against PyTorch's scaled_dot_product_attention; then the plugin's AOT
#     PTX for this GPU, loaded by the driver and launched with TensorRT's argument layout;
#  2. the PyTorch reference in fp16 and bf16 on the GPU against fp32 on the CPU
#     (scripts/gpu_numerics.py), the GPU-marked tests, and the plugin tests that run
#     NVIDIA's tensorrt.plugin code;
#  3. where TensorRT is installed: export the tiny preset, build engines in each attention
#     mode (auto, plugin, decomposed, native), run and validate them against PyTorch. This
#     is what exercises the TensorRT behaviours the CPU tests can only assume: the parser
#     binding the node to the plugin, the builder's calls into tensorrt.plugin, the AOT
#     launch (argument order, no scratch pointers, 48 KiB static shared memory), the PTX
#     loading on this driver, and plugin engines deserializing without Python plugin code.
# Paste the output into docs/gpu-validation.md with the date and device.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
failed=()
passed=()

check() {  # check NAME COMMAND...: run it, remember how it went
  local name=$1
  shift
  echo "## $name"
  if "$@"; then passed+=("$name"); else failed+=("$name (exit $?)"); fi
}

echo "## device"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

check "kernel vs reference, and timing" \
  $PY -m saisa_edge.plugins.selfcheck --device cuda --dtypes fp32,fp16,bf16 --timing
check "AOT PTX through the CUDA driver, TensorRT's argument layout" \
  $PY -m saisa_edge.plugins.selfcheck --device cuda --ptx --dtypes fp32,fp16,bf16
check "PyTorch reference in fp16/bf16 on the GPU vs fp32 on the CPU" $PY scripts/gpu_numerics.py
check "gpu tests" $PY -m pytest -q -m gpu
check "plugin tests (NVIDIA's tensorrt.plugin, AOT PTX, launch replay)" \
  $PY -m pytest -q tests/test_plugins.py tests/test_trt_plugin_qdp.py

if $PY -c "import tensorrt; tensorrt.Builder" 2>/dev/null; then
  $PY -c "import tensorrt; print('tensorrt', tensorrt.__version__)"
  work=$(mktemp -d)
  check "make tiny checkpoint" $PY -m saisa_edge make-checkpoint --preset tiny -o "$work/tiny"
  check "export custom (fp16)" $PY -m saisa_edge export "$work/tiny" -o "$work/art" --dtype fp16
  check "export plugin (fp16)" $PY -m saisa_edge export "$work/tiny" -o "$work/art-plugin" --dtype fp16 \
    --attention plugin
  check "export native (fp16, opset 23)" $PY -m saisa_edge export "$work/tiny" -o "$work/art-native" \
    --dtype fp16 --attention native --opset 23
  for mode in auto plugin decomposed native plugin-artifact; do
    art="$work/art" attention=$mode
    [ "$mode" = native ] && art="$work/art-native"
    [ "$mode" = plugin-artifact ] && art="$work/art-plugin" attention=plugin
    eng="$work/eng-$mode"
    check "build --attention $mode" $PY -m saisa_edge build "$art" -o "$eng" --attention "$attention" --max-batch 2
    check "run $mode" $PY -m saisa_edge run "$eng" --image saisa_edge/assets/demo.png --prompt "Describe it." \
      --max-new-tokens 16
    check "validate $mode" $PY -m saisa_edge validate "$eng" --reference "$work/tiny" --samples 2 \
      --min-cosine 0.99 --min-top1 0.9 --min-greedy 0.5
  done
  # a plugin engine must load in a process that never imported the plugin's Python code
  check "plugin engine deserializes without tensorrt.plugin" $PY - "$work/eng-plugin" <<'EOF'
import sys
from pathlib import Path

import tensorrt as trt

runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
engine = runtime.deserialize_cuda_engine((Path(sys.argv[1]) / "decoder.engine").read_bytes())
loaded = [m for m in sys.modules if m.startswith(("tensorrt.plugin", "saisa_edge.plugins.trt_plugin", "triton"))]
print("deserialized:", engine is not None, "python plugin modules loaded:", loaded)
sys.exit(0 if engine is not None and not loaded else 1)
EOF
else
  echo "## TensorRT not installed: engine build/run skipped"
fi

echo "## summary: ${#passed[@]} passed, ${#failed[@]} failed"
for name in "${failed[@]}"; do echo "FAILED: $name"; done
[ ${#failed[@]} -eq 0 ]
