#!/usr/bin/env bash
# Pretraining on a SLURM cluster: one task per GPU, every node running the same script.
#
#   sbatch --nodes 8 --gres gpu:8 --ntasks-per-node 8 tools/slurm_pretrain.sh \
#       configs/pretrain/k400/vit_base_hpm.yaml [KEY VALUE ...]
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

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-8}}
PYTHON=${PYTHON:-python}

cd "$(dirname "$0")/.."
srun --kill-on-bad-exit=1 "$PYTHON" run_pretrain.py --config "$config" "$@"
