"""Training machinery shared by pretraining and fine-tuning: distributed set-up, DeepSpeed, optimiser
groups and schedules, checkpoints, logging."""

# torch.compile modes (``ENGINE.COMPILE_MODE``); here so tools can offer them without fvcore.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
