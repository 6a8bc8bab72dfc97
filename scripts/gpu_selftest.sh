#!/usr/bin/env bash
# Everything GPU-bound this project can check, on a machine with an NVIDIA GPU:
#  1. the NAAViT Triton kernel against its PyTorch reference on the device (fp32/fp16/bf16);
#  2. its timing against PyTorch's scaled_dot_product_attention on the same shapes;
#  3. the GPU-marked tests;
#  4. where TensorRT is installed: export the tiny preset, build engines, run them and
#     validate them against the PyTorch reference.
# Prints JSON/text sections; paste them into docs/gpu-validation.md with the date and device.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "## device"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

echo "## kernel vs reference, and timing"
python -m saisa_edge.plugins.selfcheck --device cuda --dtypes fp32,fp16,bf16 --timing

echo "## gpu tests"
python -m pytest -q -m gpu || true

if python -c "import tensorrt; tensorrt.Builder" 2>/dev/null; then
  echo "## TensorRT build + run + compare"
  work=$(mktemp -d)
  python -m saisa_edge make-checkpoint --preset tiny -o "$work/tiny"
  python -m saisa_edge export "$work/tiny" -o "$work/art" --dtype fp16
  for mode in plugin decomposed; do
    python -m saisa_edge build "$work/art" -o "$work/eng-$mode" --attention "$mode" --max-batch 2
    python -m saisa_edge run "$work/eng-$mode" --image saisa_edge/assets/demo.png --prompt "Describe it." --max-new-tokens 16
    python -m saisa_edge validate "$work/eng-$mode" --reference "$work/tiny" --samples 2 --min-cosine 0.99 --min-top1 0.9 --min-greedy 0.5
  done
else
  echo "## TensorRT not installed: engine build/run skipped"
fi
