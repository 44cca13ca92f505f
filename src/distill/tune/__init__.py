"""Hyperparameter search over a recipe with Optuna (`distill tune RECIPE.yaml --trials N`): config,
space, trials, study, report. May import run, engine and below; never cli.

A tune recipe is a normal recipe plus two blocks:

```yaml
search:                                   # dotted recipe keys -> how to sample them
  trainer.optimizer.lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}
  objective.terms.kd.init_args.temperature: {type: float, low: 1, high: 8}
  student.init_args.hidden: {type: categorical, choices: [[64], [128], [256, 128]]}
tune:
  objectives: [{metric: accuracy, direction: maximize}]
  pruner: median
```

Each trial is a normal `distill.run.pipeline.run_recipe` run in `<out>/trials/<number>/` (config.yaml,
metrics.jsonl, checkpoints, summary.json), distilling from one teacher trained once and cached in
`<out>/teacher.safetensors`. The study lives in SQLite (`<out>/study.db`), so a second invocation
continues it (and resumes trials cut short by a crash from their last checkpoint) and several
processes can share it. Objectives are read from the trial's last validation evaluation
(`accuracy`, `nll`, `agreement`) or, for costs, from its measured row (`params`, `size_mb`,
`latency_ms_b1`, ...); the test split is only reported, never optimised.

Optuna is an optional extra: it is imported inside the functions that need it.

Modules: `config` (the tune recipe), `space` (search keys, sampling), `trials` (the teacher once,
one run per trial), `study` (Optuna study control, resumption), `report` (tables, plots, best
recipe).
"""

from distill.tune.config import load_tune_recipe, parse_tune_recipe
from distill.tune.study import run_tune

__all__ = ["load_tune_recipe", "parse_tune_recipe", "run_tune"]
