"""Training techniques switched on from the config: DP-SGD privacy (Opacus), distillation, EMA,
BatchNorm statistics recomputed after training.

Each is built from its config section and plugs into the loop in src/engine/. May import
checkpoint, data, models, distributed and below; never engine or run.
"""
