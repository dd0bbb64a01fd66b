"""Training machinery shared by pretraining and fine-tuning: distributed set-up, DeepSpeed, optimiser
groups and schedules, checkpoints, logging."""
