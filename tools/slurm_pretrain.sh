#!/usr/bin/env bash
# Pretraining on a SLURM cluster: one task per GPU, every node running the same script.
#
#   sbatch --nodes 8 --gres gpu:8 --ntasks-per-node 8 tools/slurm_pretrain.sh \
#       configs/pretrain/k400/vit_base_hpm.yaml [KEY VALUE ...]     # from the repository root
#
# srun starts the tasks; hpm_video maps SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID onto
# RANK / WORLD_SIZE / LOCAL_RANK, and this script picks the first node as the rendezvous host.
#SBATCH --job-name=hpm-pretrain
#SBATCH --cpus-per-task=10
#SBATCH --time=72:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: sbatch tools/slurm_pretrain.sh CONFIG [KEY VALUE ...]" >&2
  exit 2
fi
config=$1
shift

# Read the whole list (not `| head -n 1`: with pipefail, scontrol killed by SIGPIPE ends the job).
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${hosts[0]}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-8}}
PYTHON=${PYTHON:-python}

# sbatch runs a copy of this script from its spool folder, where $0 does not lead to the repository:
# run from the folder the job was submitted from (the repository root, as in the example above).
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
if [ ! -f run_pretrain.py ]; then
  echo "error: $PWD has no run_pretrain.py; submit the job from the hpm-video repository root" >&2
  exit 2
fi
srun --kill-on-bad-exit=1 "$PYTHON" run_pretrain.py --config "$config" "$@"
