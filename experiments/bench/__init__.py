"""Benchmark scripts. Each prints ratios against a reference measured in the same run.

Their command lines check what they are given before anything is built, timed or written (a GPU lease is short):
the argparse types and checks below report ``error: ...`` naming the option, what was expected and what came."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def _integer(text: str, low: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (argparse's error names the option)."""
    return _integer(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _integer(text, 0, "an integer >= 0")


def positive_number(text: str) -> float:
    """argparse type: a finite number > 0 (nan, inf, 0 and negatives would give a meaningless ratio)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def check_out_dir(parser: argparse.ArgumentParser, path, option: str = "--out") -> None:
    """parser.error naming ``option`` where ``path`` exists and is not a directory (found before measuring, not
    when the results are written)."""
    if Path(path).exists() and not Path(path).is_dir():
        parser.error(f"{option}: expected a directory, got {str(path)!r}, which is a file")


def check_preset(parser: argparse.ArgumentParser, option: str, preset: str, family: str | None = None,
                 overrides=()):
    """The model config of ``preset`` with ``overrides``; parser.error naming ``option`` where it does not load or,
    with ``family``, is another family's (a transformer measured under Falcon Mamba's label, say)."""
    from configs import ConfigError, load_model_config

    try:
        config = load_model_config(preset, list(overrides))
    except ConfigError as err:
        parser.error(f"{option}: {err}")
    if family is not None and config.family != family:
        parser.error(f"{option}: expected a preset of model.family {family!r}, got {preset!r} (model.family "
                     f"{config.family!r})")
    return config


def check_runs(parser: argparse.ArgumentParser, presets: list[str], overrides: list[str],
               option: str = "presets") -> list:
    """Every preset's run config with the overrides, loaded before anything is compiled; parser.error naming the
    preset where one does not load, or where no preset is given (only key=value overrides)."""
    from configs import ConfigError, load_config

    if not presets:
        parser.error(f"{option}: expected at least one preset name or YAML path before the key=value overrides, got "
                     f"only {overrides}")
    runs = []
    for preset in presets:
        try:
            runs.append(load_config(preset, overrides))
        except ConfigError as err:
            parser.error(f"{option}: {preset!r} with {overrides}: {err}")
    return runs
