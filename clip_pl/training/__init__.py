"""Training: the LightningModule, its optimizer and schedule, callbacks, SLURM requeue, FSDP sharding."""
