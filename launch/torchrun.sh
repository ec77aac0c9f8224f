#!/usr/bin/env bash
# Launch one stage with torchrun, single node or multi node (rendezvous from the environment).
#
#   launch/torchrun.sh RECIPE.yaml [dotted.key=value ...]
#
# Environment (all optional):
#   NPROC_PER_NODE  processes per node (default: number of GPUs, or 1 on a CPU-only machine)
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's rank, for a static rendezvous (default 0; not needed with c10d rendezvous)
#   MASTER_ADDR     rendezvous host (default localhost); MASTER_PORT (default 29500)
#   RDZV_ID         job id shared by all nodes (default: $SLURM_JOB_ID, else qwen2vl-MASTER_ADDR-MASTER_PORT);
#                   a restart of the job takes over its run_dir lock by this id, so give each job its own
#   MAX_RESTARTS    torchrun restarts after a failure (default 0); each restart resumes from the latest
#                   complete checkpoint (checkpoint.resume: auto)
#   RDZV_TIMEOUT    multi node: seconds a (re-)rendezvous waits for all NNODES nodes (default 600)
#   OMP_NUM_THREADS CPU threads per process (default 1 on CPU-only machines, where ranks share the cores)
#
# Multi node: run the same command on every node with the same MASTER_ADDR/NNODES/RDZV_ID; the c10d rendezvous
# assigns node ranks. MASTER_ADDR is the address of the node that hosts the rendezvous (it must resolve there to
# one of its own addresses, and every node's hostname must resolve on the others); GLOO_SOCKET_IFNAME /
# NCCL_SOCKET_IFNAME pick the interface. On CPU-only machines the processes use gloo; on GPUs, NCCL
# (parallel.backend: auto).
#
# Losing a node: the other nodes' workers fail (at once on a reset connection, within parallel.timeout_s on a
# silent one); with MAX_RESTARTS > 0 their agents restart them and wait up to RDZV_TIMEOUT for the node to
# rejoin: start the same command on the repaired or a replacement node (the rendezvous host must survive) and
# the job resumes from the latest complete checkpoint. If no node comes, they fail with RendezvousTimeoutError.
# See docs/cluster.md.
#
# A mistake in the recipe, the layout or the paths is one line (printed by rank 0), repeated as the last line of
# the output after torchrun's report, and the exit code is the trainer's (2; 3 for a stopped run): torchrun runs
# inside `python -m core.launch`, the same process, so signals reach it as before.
set -euo pipefail
if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,31p' "$0"; [[ $# -ge 1 ]] && exit 0; exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/gpus.sh"
NPROC_PER_NODE="${NPROC_PER_NODE:-$(( LOCAL_GPUS > 0 ? LOCAL_GPUS : 1 ))}"
NNODES="${NNODES:-1}"
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-29500}"
# The default id is unique among jobs running at once (two jobs cannot share one rendezvous endpoint): a restart
# recognises its own job by it (train/run_lock.py).
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-qwen2vl-$MASTER_ADDR-$MASTER_PORT}}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
PYTHON="${PYTHON:-python}"

if [[ "$NNODES" == "1" && -z "${FORCE_RDZV:-}" ]]; then
  # One node: a private rendezvous on a free port, so two jobs on one machine never collide.
  exec "$PYTHON" -m core.launch torchrun --standalone --nnodes=1 --nproc-per-node="$NPROC_PER_NODE" \
    --max-restarts="$MAX_RESTARTS" -m train "$@"
fi
# NOTE: torch shares the rendezvous host's TCPStore with the workers by default, and a node that joins a running
# job then never gets the store's address (the rendezvous host keeps the first round's bootstrap info), nor can
# the workers namespace the store by restart count, which differs between a surviving and a replacement node
# (pytorch/pytorch#135712). Without sharing, every rendezvous round publishes a fresh address and worker rank 0
# hosts a new store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
exec "$PYTHON" -m core.launch torchrun --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID" \
  --rdzv-conf="join_timeout=${RDZV_TIMEOUT:-600}" --max-restarts="$MAX_RESTARTS" -m train "$@"
