"""What every trainer shares: the run scaffold (``scaffold``), optimiser and schedule (``optim``),
checkpoints (``checkpoints``), data parallelism under torchrun (``distributed``), LoRA (``lora``),
the response-token LM loss (``lm_loss``) and the over-optimisation monitor (``monitor``)."""
