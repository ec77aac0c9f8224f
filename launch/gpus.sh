# Sourced by the launch scripts: LOCAL_GPUS = the GPUs nvidia-smi lists on this machine (0 without GPUs or
# without nvidia-smi). On a CPU-only machine the training processes share the cores: OMP_NUM_THREADS defaults
# to 1 per process.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  LOCAL_GPUS=$(nvidia-smi -L | wc -l)
else
  LOCAL_GPUS=0
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
