#!/usr/bin/env bash
# One GPU: keras_strategies against the native way on that GPU, per backend,
# within a time budget (a lent machine's minutes), most wanted cases first.
#
#     bash benchmarks/gpu_run.sh OUT_DIR [SECONDS]
#
# First a smoke run of each engine on the GPU (stops here, early, if one
# fails: no minutes spent on runs that cannot work); then benchmarks/run.py
# --device gpu case by case: MLP, conv net, BatchNorm conv net, each with
# JAX (Default, Mirrored) and PyTorch (Default, MultiWorkerMirrored against
# a hand-written DDP loop), 4 alternating rounds; JAX MultiWorkerMirrored
# last. Each run.py writes OUT_DIR/gpu-<part>.json; one stopped by the
# budget leaves OUT_DIR/gpu-<part>.json.partial with every run it finished
# (`run.py --resume` with the same options goes on from there). Each run
# leaves out its first WARMUP epochs (default 2: on an H200 the second
# epoch of most JAX runs was still slow, and Keras's DataParallel over one
# device compiles its step again there). Env: PYTHON, REPEATS (4), EPOCHS
# (5), WARMUP (2), STEPS (100), PARTS (the part names to run, in this
# script's order, e.g. "torch-default-cnn jax-bn_convnet"; default all),
# DEVICE (gpu; cpu to try this script on a machine without one),
# OPTIMIZER (adam; e.g. sgd: the output files get its name as a suffix),
# TORCH_METHODS (ks,native,keras_ddp,torch_ddp), SKIP_SMOKE (1: a second
# call on a machine where the smoke run already passed).
# TensorFlow runs too where it is installed.
set -u
out=${1:?usage: gpu_run.sh OUT_DIR [SECONDS]}
budget=${2:-480}
py=${PYTHON:-python3}
device=${DEVICE:-gpu}
end=$(( $(date +%s) + budget ))
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the smoke runs worker.py without run.py

echo "== smoke: each engine trains on the $device"
[ "${SKIP_SMOKE:-0}" = 1 ] && echo "(skipped: SKIP_SMOKE=1)"
for backend in jax torch tensorflow; do
  [ "${SKIP_SMOKE:-0}" = 1 ] && break
  $py -c "import $backend" 2>/dev/null || { echo "$backend: not installed, left out"; continue; }
  methods="ks"
  [ $backend = torch ] && methods="ks torch_ddp"
  for method in $methods; do
    strategy=default
    [ $method = torch_ddp ] && strategy=multi_worker
    launcher=()
    [ $strategy = multi_worker ] && launcher=(-m keras_strategies.launch --nproc-per-node 1 --timeout 120)
    if ! KERAS_BACKEND=$backend timeout 180 $py "${launcher[@]}" benchmarks/worker.py --method $method \
        --strategy $strategy --replicas 1 --epochs 2 --steps 3 --device $device --out /tmp/gpu-smoke \
        > /tmp/gpu-smoke.log 2>&1; then
      tail -30 /tmp/gpu-smoke.log
      echo "SMOKE FAILED: $backend $method on the $device; nothing measured"
      exit 3
    fi
    echo "$backend $method: ok ($(cat /tmp/gpu-smoke.rank0.json | head -c 200))"
  done
done

part() {  # part NAME run.py-options...
  local name=$1; shift
  if [ -n "${PARTS:-}" ] && [[ " $PARTS " != *" $name "* ]]; then return; fi
  local left=$(( end - $(date +%s) ))
  if [ $left -lt 40 ]; then echo "== $name: out of time, not run"; return; fi
  echo "== $name (${left}s left)"
  timeout -s TERM $left $py benchmarks/run.py --device $device --replicas 1 --repeats ${REPEATS:-4} \
    --epochs ${EPOCHS:-5} --warmup-epochs ${WARMUP:-2} --steps ${STEPS:-100} --timeout 120 --no-plot \
    --optimizer ${OPTIMIZER:-adam} --out "$out/gpu-$name${OPTIMIZER:+-$OPTIMIZER}.json" "$@"
}
# most wanted first: each engine's MLP, then the conv nets
torch_methods=(--methods ${TORCH_METHODS:-ks,native,keras_ddp,torch_ddp})
for workload in mlp cnn bn_convnet; do
  part jax-$workload --backends jax --strategies default,mirrored --workloads $workload
  part torch-multi-worker-$workload --backends torch --strategies multi_worker --workloads $workload "${torch_methods[@]}"
  part torch-default-$workload --backends torch --strategies default --workloads $workload "${torch_methods[@]}"
  part tensorflow-$workload --backends tensorflow --strategies default,mirrored --workloads $workload
done
part jax-multi-worker --backends jax --strategies multi_worker --workloads mlp,cnn
echo "== done"
