#!/usr/bin/env bash
# GPU benchmarks in one command (~6 minutes on one H100): the BN op table with
# achieved bandwidth vs a copy of the same bytes, and ResNet-50 / ResNet-20
# train-step throughput with bnlab BN vs Flax BN vs no BN. JSON + Markdown go
# to benchmarks/results/ (or $OUT_DIR), named after the device platform.
#   bash benchmarks/gpu.sh            # on the GPU machine
#   bash benchmarks/gpu.sh --smoke    # anywhere (CPU), tiny shapes, to check it runs
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=()
out=${OUT_DIR:-benchmarks/results}
if [ "${1:-}" = "--smoke" ]; then
  smoke=(--smoke)
  out=${OUT_DIR:-$(mktemp -d)}  # smoke results are not results
fi
echo "results -> $out"
python -c "import jax; print('devices:', jax.devices())"
python -m benchmarks.bn_op --batch 128 --reps 20 --out "$out" "${smoke[@]}" \
  --name "bn_op_$(python -c 'import jax; print(jax.devices()[0].platform)')${smoke:+_smoke}"
python -m benchmarks.throughput --model resnet50 --batch 128 --reps 10 --out "$out" "${smoke[@]}"
python -m benchmarks.throughput --model resnet20 --batch 128 --reps 20 --out "$out" "${smoke[@]}"
