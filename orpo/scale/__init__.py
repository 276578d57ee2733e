"""Scale: the launch environment and Accelerator, recipe-vs-launch checks, DeepSpeed ZeRO, memory per GPU."""
