"""Beyond one process, with existing engines: how a sweep job shares its machine and the
launcher plugins (launch.py), torchrun ranks (distributed.py), Optuna (search.py) and the
sweep-end summary (callbacks.py)."""
