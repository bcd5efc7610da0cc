"""Saving and restoring a run's whole training state: how resume works.

`Checkpointer` names, writes and falls back between checkpoints (last, previous, best, top-k);
`writer` writes them on a background thread; `train_state` and `rng` are what a step needs to
continue exactly. May import errors, config, results, distributed and optim; never engine or run.
"""
