"""The training loop (`Trainer`), evaluation, the tester, and what a step needs around it: precision,
the logging window, throughput and FLOPs, stop signals, building from the config.

May import every folder below it (config, data, models, optim, evaluators, tracking, distributed,
results, checkpoint, techniques); never run, workflows or search.
"""
