"""The logic behind script/'s workflow commands: splits, cross-validation, sweeps, comparison."""
