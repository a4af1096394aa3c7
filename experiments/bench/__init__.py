"""Benchmark scripts. Each prints ratios against a reference measured in the same run.

Their command lines check what they are given before anything is built, timed or written (a GPU lease is short):
the argparse types and checks below report ``error: ...`` naming the option, what was expected and what came.

Every result file a script writes (a CSV, a JSON) gets NAME.provenance.json beside it (write_provenance): the date,
the command, the package versions and the device, which docs/BENCHMARKS.md gave by hand."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

# distributions whose versions a provenance gives (None: not installed)
PROVENANCE_PACKAGES = ("jax", "jaxlib", "flax", "torch", "transformers", "mamba_ssm")
DEVICE_KEYS = ("backend", "device_kind", "device_count")


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


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name`` from its metadata (nothing imported: torch and mamba_ssm take
    seconds), else an already imported module's __version__, else None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return getattr(sys.modules.get(name), "__version__", None)


def jax_device() -> dict:
    """backend, device_kind and device_count of this process's JAX devices (starts the backend)."""
    import jax

    devices = jax.devices()
    return {"backend": jax.default_backend(), "device_kind": devices[0].device_kind, "device_count": len(devices)}


def provenance(module: str, argv=None, device: dict | None = None) -> dict:
    """What docs/BENCHMARKS.md gives with each table: date_utc, the command (``python -m module`` and ``argv``,
    default sys.argv[1:]), python and platform, the versions of PROVENANCE_PACKAGES, and the device: this process's
    JAX devices, or ``device`` (DEVICE_KEYS) where this process must not start a backend (long_context's parent:
    its workers hold the accelerator) or its devices are not jax.devices() (tpu_compile's compile-only TPU)."""
    argv = sys.argv[1:] if argv is None else argv
    info = {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": shlex.join(["python", "-m", module, *map(str, argv)]),
            "python": platform.python_version(), "platform": platform.platform()}
    info.update({name: package_version(name) for name in PROVENANCE_PACKAGES})
    info.update(jax_device() if device is None else {key: device.get(key) for key in DEVICE_KEYS})
    return info


def provenance_path(result) -> Path:
    """Where write_provenance puts ``result``'s: beside it, NAME.provenance.json for NAME.csv or NAME.json."""
    result = Path(result)
    return result.with_name(f"{result.stem}.provenance.json")


def write_provenance(result, info: dict) -> Path:
    """Writes ``info`` (a provenance()) beside the result file ``result``; returns its path."""
    path = provenance_path(result)
    path.write_text(json.dumps(info, indent=1) + "\n")
    return path
