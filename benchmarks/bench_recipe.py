"""Benchmark scripts read their settings from a YAML file in `recipes/` (command-line flags win).

The file holds `benchmark: <script name>` and `args:`, a mapping of the script's flags (dashes or
underscores) to values; it is read with `yaml.safe_load` (through `distill.run.config.load_yaml`).
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(ap: argparse.ArgumentParser, name: str, argv: list[str] | None = None) -> argparse.Namespace:
    """Parses `argv` with defaults taken from `--config` (default `recipes/<name>.yaml`).

    Args:
        ap: the script's parser (its own defaults apply to flags the YAML leaves out).
        name: the benchmark's name; the YAML's `benchmark:` must match it.
        argv: command-line arguments (default: `sys.argv[1:]`).

    Raises:
        ConfigError: the file is missing or malformed, names another benchmark, or sets an unknown flag.
    """
    from distill.errors import ConfigError
    from distill.run.config import load_yaml

    default = ROOT / "recipes" / f"{name}.yaml"
    ap.add_argument(
        "--config",
        default=str(default),
        help=f"YAML settings (default {default.relative_to(ROOT)}); flags given here override it",
    )
    pre, _ = ap.parse_known_args(argv)
    path = Path(pre.config)
    raw = load_yaml(path)
    unknown = set(raw) - {"benchmark", "args"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; use 'benchmark:' and 'args:'")
    if raw.get("benchmark") != name:
        raise ConfigError(
            f"{path} is for benchmark {raw.get('benchmark')!r}, not {name!r}; pass its own --config"
        )
    values = raw.get("args") or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: 'args:' must be a mapping of flag: value, not {type(values).__name__}")
    dests = {a.dest for a in ap._actions if a.dest not in ("help", "config")}
    defaults = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in dests:
            near = difflib.get_close_matches(dest, sorted(dests), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f"; known: {', '.join(sorted(dests))}"
            raise ConfigError(f"{path}: unknown setting args.{key}{hint}")
        defaults[dest] = value
    ap.set_defaults(**defaults)
    return ap.parse_args(argv)
