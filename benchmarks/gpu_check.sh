#!/usr/bin/env bash
# The GPU checks, in one go (under 8 minutes on one H100): the CUDA tests, the kernel sweep at
# Llama-3.1-8B shapes, the fused RMSNorm/SwiGLU against transformers' modules, the 8B-shaped NF4
# training step against PEFT + bitsandbytes, and with 2+ GPUs the distributed tests, benchmark and
# `qlora-inject train` under torchrun (nccl).
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]          # default: benchmarks/results/gpu
#   bash benchmarks/gpu_check.sh --smoke RESULTS_DIR    # the same steps on the CPU at tiny shapes
#
# Needs torch with CUDA, triton, transformers and peft. bitsandbytes (for the NF4 step and the
# bitsandbytes CUDA tests) may come as wheels in .whl/ (see benchmarks/RESULTS.md); they are
# installed into /tmp/site first. Each part runs even when an earlier one failed; the exit status
# is that of the first failure.
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
results=${1:-benchmarks/results/gpu}
site=${QLORA_INJECT_SITE:-/tmp/qlora-site}
mkdir -p "$results"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
status=0

step() {                                             # step NAME COMMAND...: run, log, remember a failure
    local name=$1
    shift
    echo "== $name: $*"
    local began=$SECONDS
    "$@" 2>&1 | tee "$results/$name.log"
    local code=${PIPESTATUS[0]}
    echo "== $name: exit $code after $((SECONDS - began)) s"
    [ "$code" -eq 0 ] || [ "$status" -ne 0 ] || status=$code
}

if compgen -G ".whl/*.whl" >/dev/null; then
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The package itself, laid out as pyproject.toml installs it (`kernels/` as qlora_inject.kernels),
# without pip, a build backend or the machine's torch being touched.
rm -rf "$site" && mkdir -p "$site" && cp -r qlora_inject "$site/" && cp -r kernels "$site/qlora_inject/kernels" \
    && export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
if [ "$smoke" -eq 1 ]; then
    kernel_args=(--device cpu --shapes 128x128 --tokens 1,8 --dtype fp32 --repeat 1)
    fused_args=(--device cpu --tokens 16 --hidden 64 --intermediate 128 --repeat 1)
    step_args=(--formats nf4 --dtype bf16 --hidden 64 --heads 4 --kv-heads 2 --vocab 256 --layers 1 --seq 16 --steps 1
               --gradient-checkpointing)
else
    $python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
        || exit 1
    kernel_args=()
    fused_args=(--device cuda --tokens 8192)
    step_args=(--preset llama-8b)
fi

step cuda_tests $python -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_kernels.py tests/test_fused_ops.py -k "cuda or compiled"
step kernels $python benchmarks/bench_kernels.py "${kernel_args[@]}" --output "$results"
step fused_ops $python benchmarks/bench_fused_ops.py "${fused_args[@]}" --output "$results"
step model_step $python benchmarks/bench_model_step.py "${step_args[@]}" --output "$results"
# Two GPUs or more: the distributed tests (torchrun's `qlora-inject train` then joins with nccl, a rank per
# GPU), the distributed benchmark with nccl, and `qlora-inject train` under torchrun, DDP then FSDP2.
gpus=$($python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$smoke" -eq 0 ] && [ "$gpus" -ge 2 ]; then
    step distributed_tests $python -m pytest -q -p no:cacheprovider -rs tests/test_distributed.py
    step distributed_bench $python benchmarks/bench_distributed.py --hidden 2048 --layers 8 --batch 8 --seq 512 \
        --steps 5 --output "$results"
    for engine in ddp fsdp; do
        flag=(); [ "$engine" = fsdp ] && flag=(--fsdp)
        step "train_$engine" $python -m torch.distributed.run --nproc_per_node 2 -m qlora_inject.cli train \
            --model tiny --steps 20 --no-progress "${flag[@]}" --output "$results/train_$engine"
    done
else
    echo "== distributed: skipped (${gpus} CUDA devices here; it needs 2)"
fi
echo "results in $results"
exit $status
