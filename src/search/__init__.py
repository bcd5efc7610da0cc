"""Hyperparameter search: grid and random sweeps, Optuna studies, Ray Tune, and the search spaces
they share (`key=v1,v2`, `key=loguniform:a:b`).

Builds on workflows/ (running and recording many runs); nothing in src/ imports it.
"""
