"""Many runs from one command: cross-validation splits and folds, lr_find, comparing two models,
and `runs` (find, record and summarise runs) that search/ builds on too.

May import engine and everything below it; never run or search.
"""
