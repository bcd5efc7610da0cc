"""Several processes: the process group (torchrun, Ray or SLURM variables), DDP and FSDP2 wrapping.

May import errors and config only, so every other folder can ask which rank it is.
"""
