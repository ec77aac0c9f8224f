#!/usr/bin/env bash
# Launch one stage with the DeepSpeed launcher (it starts the processes; the engine stays PyTorch-native).
#
#   launch/deepspeed.sh RECIPE.yaml [dotted.key=value ...]
#
# Environment: NUM_GPUS (processes per node; default all GPUs, or 2 on a CPU-only machine), HOSTFILE (MPI-style
# "host slots=N" lines, for multi node), MASTER_PORT (default 29500).
#
# Equivalent to `deepspeed --num_gpus N --module train RECIPE.yaml ...`. The launcher passes --local_rank=<n>
# and sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; `python -m train` accepts and checks both.
# (DeepSpeed's runner spells the module flag `--module`; it has no `-m`.)
# A mistake in the recipe, the layout or the paths is one line (printed by rank 0), repeated as the last line of
# the output, with the trainer's exit code (2; 3 for a stopped run): the runner runs inside `python -m core.launch`.
# PYTHON: the interpreter (default python).
set -euo pipefail
if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,15p' "$0"; [[ $# -ge 1 ]] && exit 0; exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/gpus.sh"
ARGS=(--num_gpus "${NUM_GPUS:-$(( LOCAL_GPUS > 0 ? LOCAL_GPUS : 2 ))}" --master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
  ARGS+=(--hostfile "$HOSTFILE")
fi
exec "${PYTHON:-python}" -m core.launch deepspeed "${ARGS[@]}" --module train "$@"
