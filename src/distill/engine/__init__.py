"""The engine: the one training loop (`Trainer`), its settings, evaluators, DDP/FSDP2 and progress.
May import the contracts, `objective` and `teachers`; never a loss, the recipe schema, run or cli.
"""
