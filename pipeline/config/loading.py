"""YAML loading, ``--set`` overrides and validation: an unknown key, a wrong type or a value out of range is a
:class:`ConfigError` naming the key and the file."""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pipeline.config.schema import READER_EDIT_ATTRIBUTES, PipelineConfig
from pipeline.errors import ConfigError

DEMO_CONFIG = "demo.yaml"


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        key, value = typing.get_args(tp)
        return f"a mapping of {_type_name(key)} to {_type_name(value)}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", type(None): "null"}.get(
        tp, str(tp)
    )


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp``, or raise ``TypeError``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise TypeError
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg)
            except TypeError:
                continue
        raise TypeError
    if origin is list:
        if not isinstance(value, list):
            raise TypeError
        return [_coerce(v, typing.get_args(tp)[0]) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(k, key_tp): _coerce(v, value_tp) for k, v in value.items()}
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(PipelineConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(PipelineConfig) if not f.metadata.get("internal")}


def _build_section(section: str, cls: type, values: Any, source: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(
                f"{source}: unknown key '{section}.{key}' (known keys in '{section}': {', '.join(sorted(hints))})"
            )
        try:
            kwargs[key] = _coerce(value, hints[key])
        except TypeError:
            raise ConfigError(
                f"{source}: '{section}.{key}' must be {_type_name(hints[key])}, got {value!r}"
            ) from None
    return cls(**kwargs)


def _check_values(cfg: PipelineConfig) -> None:
    """Range checks that the type system cannot express."""

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{cfg.source}: '{key}' {why}")

    positive_ints = {
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size or 1,
        "train.val_every": cfg.train.val_every,
        "evaluate.sw_batch_size": cfg.evaluate.sw_batch_size,
        "data.num_folds": cfg.data.num_folds - 1,
    }
    for key, value in positive_ints.items():
        if value < 1:
            fail(key, f"must be >= 1, got {value}")
    if cfg.train.iterations_per_epoch < 0:
        fail("train.iterations_per_epoch", "must be >= 0 (0: one pass over the training cases)")
    if cfg.data.synthetic_cases < 0:
        fail("data.synthetic_cases", "must be >= 0")
    if not 0 <= cfg.data.fold < cfg.data.num_folds:
        fail("data.fold", f"must be in 0..{cfg.data.num_folds - 1} for data.num_folds={cfg.data.num_folds}")
    if cfg.train.num_workers is not None and cfg.train.num_workers < 0:
        fail("train.num_workers", "must be >= 0 or null (automatic)")
    if cfg.train.ema_decay is not None and not 0.0 < cfg.train.ema_decay < 1.0:
        fail("train.ema_decay", f"must be in (0, 1) or null (no weight average), got {cfg.train.ema_decay}")
    if not 0.0 <= cfg.train.foreground_ratio <= 1.0:
        fail("train.foreground_ratio", f"must be between 0 and 1, got {cfg.train.foreground_ratio}")
    if cfg.pacs.min_slices < 1:
        fail("pacs.min_slices", f"must be >= 1, got {cfg.pacs.min_slices}")
    if cfg.registry.promote_margin < 0:
        fail("registry.promote_margin", f"must be >= 0, got {cfg.registry.promote_margin}")
    if cfg.registry.gate_lease_s < 1:
        fail("registry.gate_lease_s", f"must be >= 1 (seconds), got {cfg.registry.gate_lease_s:g}")
    if cfg.registry.gate_wait_s < 0:
        fail("registry.gate_wait_s", f"must be >= 0 (seconds), got {cfg.registry.gate_wait_s:g}")
    if cfg.registry.model_cache_max_gb is not None and not cfg.registry.model_cache_max_gb >= 0:
        fail("registry.model_cache_max_gb", f"must be >= 0 (GB) or null (no cap), got {cfg.registry.model_cache_max_gb:g}")
    if cfg.registry.compiled_cache_max_gb is not None and not cfg.registry.compiled_cache_max_gb >= 0:
        fail("registry.compiled_cache_max_gb",
             f"must be >= 0 (GB) or null (no cap), got {cfg.registry.compiled_cache_max_gb:g}")
    if cfg.mlflow.outage_wait_minutes < 0:
        fail("mlflow.outage_wait_minutes", f"must be >= 0, got {cfg.mlflow.outage_wait_minutes}")
    if cfg.evaluate.surface_tolerance_mm <= 0:
        fail("evaluate.surface_tolerance_mm", f"must be > 0, got {cfg.evaluate.surface_tolerance_mm}")
    if not 0.0 <= cfg.evaluate.overlap < 1.0:
        fail("evaluate.overlap", f"must be in [0, 1), got {cfg.evaluate.overlap}")
    if cfg.train.learning_rate < 0:
        fail("train.learning_rate", "must be >= 0")
    if cfg.train.time_budget_minutes is not None and cfg.train.time_budget_minutes <= 0:
        fail("train.time_budget_minutes", "must be > 0 or null")
    dims = cfg.model.spatial_dims
    if len(cfg.data.synthetic_size) != 3 or min(cfg.data.synthetic_size) < 25:
        fail("data.synthetic_size", f"must be three sizes of at least 25 voxels, got {cfg.data.synthetic_size}")
    if cfg.train.patch_size is not None and len(cfg.train.patch_size) != dims:
        fail("train.patch_size", f"must have {dims} entries for model.spatial_dims={dims}, got {cfg.train.patch_size}")
    if cfg.preprocess.target_spacing is not None and len(cfg.preprocess.target_spacing) != 3:
        fail("preprocess.target_spacing", f"must have 3 entries (mm), got {cfg.preprocess.target_spacing}")
    features = cfg.model.features
    if features is not None and (len(features) < 2 or min(features) < 1):
        fail("model.features", f"must list at least two positive widths, got {features}")
    if features is not None and cfg.train.patch_size is not None:
        min_patch = 2 ** (len(features) - 1)
        if min(cfg.train.patch_size) < min_patch:
            fail("train.patch_size", f"must be >= {min_patch} along every axis for {len(features)} levels")
    classes = cfg.data.classes or []
    if any(not c.strip() for c in classes) or len({c.strip().casefold() for c in classes}) != len(classes):
        fail("data.classes", f"must list distinct, non-empty class names, got {classes}")
    for pattern in cfg.data.channel_series or []:
        try:
            re.compile(pattern)
        except re.error as exc:
            fail("data.channel_series", f"holds {pattern!r}, not a regular expression ({exc})")
    for number, rule in enumerate(cfg.data.reader_edit_rules or [], start=1):
        _check_edit_rule(number, rule, fail)
    unknown = sorted(set(cfg.data.label_aliases or {}) - set(classes))
    if unknown:
        fail("data.label_aliases", f"names {unknown[0]!r}, which is not one of data.classes {classes}")
    if cfg.data.dataset is None and cfg.data.synthetic_cases == 0:
        fail("data.dataset", "is empty and data.synthetic_cases is 0: there is nothing to train on")


def _check_edit_rule(number: int, rule: dict[str, str], fail: Any) -> None:
    """A ``data.reader_edit_rules`` rule names known attributes, each with a regular expression."""
    key = f"data.reader_edit_rules[{number}]"
    if not rule:
        fail(key, "is empty: a rule needs at least one attribute (an empty rule would match every object)")
    for attribute, pattern in rule.items():
        if attribute not in READER_EDIT_ATTRIBUTES:
            fail(key, f"names {attribute!r}, not one of {', '.join(READER_EDIT_ATTRIBUTES)}")
        try:
            re.compile(pattern)
        except re.error as exc:
            fail(key, f"holds {pattern!r} for {attribute}, not a regular expression ({exc})")


def parse_overrides(overrides: list[str], source: str = "--set") -> dict[str, dict[str, Any]]:
    """Turn ``["section.key=value", ...]`` into nested dicts; values are parsed as YAML.

    Args:
        overrides: the ``--set`` arguments.
        source: how to name their origin in error messages.
    """
    nested: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise ConfigError(f"{source}: '{item}' is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        nested.setdefault(section, {})[name] = value
    return nested


def build_config(raw: dict[str, Any], source: str, overrides: list[str] | None = None) -> PipelineConfig:
    """Validate a raw mapping (plus overrides) into a :class:`PipelineConfig`.

    Args:
        raw: the parsed YAML mapping.
        source: the file name used in error messages.
        overrides: ``section.key=value`` strings applied on top.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    set_values = parse_overrides(overrides or [])
    sections = _sections()
    for section, values in set_values.items():
        if section not in sections:
            raise ConfigError(f"--set: unknown section '{section}' (known: {', '.join(sections)})")
        base = merged.get(section) or {}
        merged[section] = {**base, **values}
    kwargs = {}
    for section, values in merged.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section '{section}' (known: {', '.join(sections)})")
        where = f"{source} (with --set)" if section in set_values else source
        kwargs[section] = _build_section(section, sections[section], values, where)
    cfg = PipelineConfig(**kwargs, source=source)
    _check_values(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load and validate a YAML config; ``None`` loads the packaged demo config.

    Relative ``data.dataset`` paths are resolved against the config file's folder.

    Args:
        path: a YAML file, or ``None`` for ``configs/demo.yaml`` shipped in the package.
        overrides: ``section.key=value`` strings applied on top of the file.
    """
    if path is None:
        resource = importlib.resources.files("configs") / DEMO_CONFIG
        text, source, base = resource.read_text(), f"configs/{DEMO_CONFIG} (packaged)", Path.cwd()
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        text, source, base = p.read_text(), str(p), p.resolve().parent
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{where}") from None
    cfg = build_config(raw, source, overrides)
    if cfg.data.dataset is not None and "://" not in cfg.data.dataset and not Path(cfg.data.dataset).is_absolute():
        cfg.data.dataset = str((base / cfg.data.dataset).resolve())
    if cfg.data.holdout is not None and not Path(cfg.data.holdout).is_absolute():
        cfg.data.holdout = str((base / cfg.data.holdout).resolve())
    if cfg.registry.evaluation_set is not None and not Path(cfg.registry.evaluation_set).is_absolute():
        cfg.registry.evaluation_set = str((base / cfg.registry.evaluation_set).resolve())
    return cfg
