#!/usr/bin/env bash
# GPU benchmarks in one command (about 8 minutes on one H100). JSON + Markdown
# go to benchmarks/results/ (or $OUT_DIR), named after the device platform:
#  - the BN op table, device time (20 calls chained in one jitted fori_loop per
#    measurement) with achieved bandwidth vs a copy chained the same way,
#  - the same per call, for comparison with the CPU table,
#  - 50 x (Dense 256 -> BN -> ReLU) SGD steps, device time and per step,
#  - ResNet-50 (224px, batch 128) train step in float32 and bf16 activations,
#    ResNet-20 train step, each bnlab BN vs Flax BN vs no BN,
#  - bnlab.train.fit vs a minimal jitted loop (digits preset),
#  - the statistics reductions alone (raw vs shifted sums).
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
plat=$(python -c 'import jax; print(jax.devices()[0].platform)')
python -m benchmarks.bn_op --batch 128 --reps 10 --device-time 20 --out "$out" "${smoke[@]}" \
  --impls flax_fast,flax_two_pass --name "bn_op_${plat}_device${smoke:+_smoke}"
python -m benchmarks.bn_op --batch 128 --reps 20 --out "$out" "${smoke[@]}" \
  --name "bn_op_${plat}${smoke:+_smoke}"
python -m benchmarks.deep_small --device-time 50 --out "$out" "${smoke[@]}"
python -m benchmarks.deep_small --out "$out" "${smoke[@]}"
python -m benchmarks.throughput --model resnet50 --batch 128 --reps 10 --out "$out" "${smoke[@]}"
python -m benchmarks.throughput --model resnet50 --batch 128 --reps 10 --dtype bfloat16 --out "$out" "${smoke[@]}"
python -m benchmarks.throughput --model resnet20 --batch 128 --reps 20 --out "$out" "${smoke[@]}"
python -m benchmarks.train_loop --out "$out" "${smoke[@]}"
python -m benchmarks.reductions --rows 65536 --features 1024 --out "$out" "${smoke[@]}"
