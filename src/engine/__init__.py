"""The training loop, the tester, checkpoints, distributed set-up and precision. Only entry points import this."""
