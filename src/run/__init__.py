"""What `train.py` and `test.py` call: the command line, `train_main` (one run from config to summary),
the launchers (torchrun, Ray Train) and the checks made before any process starts.

The top of the tree: may import every other folder except workflows and search; only entry
points (train.py, test.py, script/) import it.
"""
