"""train.py's command line, checked before Hydra runs: a mistaken override is one line that says what to write.

Hydra reports an unknown key or config option in several lines, with a hint about HYDRA_FULL_ERROR,
and exits with status 1. ``check_overrides`` composes the config from the same overrides with
Hydra's compose API (with every option that a sweep over config options names, and the first value
of any other sweep) and raises ``ValueError`` with one line, suggesting the closest key or option.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Sequence
from typing import Any

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError


def check_overrides(argv: Sequence[str], config_dir: str, config_name: str) -> None:
    """Raises ValueError with one line when Hydra could not compose the config from ``argv``'s overrides.

    Commands that only ask Hydra something (``--help``, ``--info``, shell completion, a rerun) and
    commands that change where configs are searched for (``--config-path``, ``--config-dir``) are left
    to Hydra, as is everything with ``HYDRA_FULL_ERROR=1``.

    Args:
        argv: The command-line arguments, ``sys.argv[1:]``.
        config_dir: Absolute path of the primary config directory (``@hydra.main``'s ``config_path``).
        config_name: The primary config's name (``@hydra.main``'s ``config_name``).
    """
    # Hydra's own parser (hydra.main uses it too), so flags and overrides are told apart as Hydra does.
    args = get_args_parser().parse_args(list(argv))
    asks_only = args.help or args.hydra_help or args.info or args.shell_completion or args.experimental_rerun
    if asks_only or args.config_path or args.config_dir or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except OverrideParseException as e:
        raise ValueError(f"cannot parse the override {e.override!r}: {_one_line(str(e))}") from None
    choices = [values for values in map(_values, parsed) if values]
    first = [values[0] for values in choices]
    config_name = args.config_name or config_name
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        groups = _compose(config_name, first).hydra.runtime.choices
        # Each option a sweep names is a config file that must exist; values need no such check.
        for i, values in enumerate(choices):
            if _key(values[0]).lstrip("+") in groups:
                for value in values[1:]:
                    _compose(config_name, [*first[:i], value, *first[i + 1 :]])


def _values(override: Override) -> list[str]:
    """The override as one override per value: several for a sweep, none for a sweep that Hydra cannot list."""
    if not override.is_sweep_override():
        return [override.input_line]
    try:
        return [f"{override.get_key_element()}={value}" for value in override.sweep_string_iterator()]
    except HydraException:
        # interval() and glob() sweeps: their values are known only to the sweeper.
        return []


def _key(override: str) -> str:
    return override.partition("=")[0]


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    """The config with Hydra's node; where Hydra fails, ValueError with one line and the closest key or option."""
    try:
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except MissingConfigException as e:
        if not e.options:
            raise ValueError(_one_line(str(e))) from None
        group, _, option = e.missing_cfg_file.rpartition("/")
        close = difflib.get_close_matches(option, e.options, n=1)
        hint = f"; did you mean {group}={close[0]}?" if close else ""
        raise ValueError(f"unknown option {group}={option}{hint} (options: {', '.join(e.options)})") from None
    except ConfigCompositionException as e:
        cause = e.__cause__
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
            key = _typed_key(cause.full_key, overrides)
            others = [o for o in overrides if _key(o) != key]
            close = difflib.get_close_matches(key, _known_keys(config_name, others, key.startswith("hydra.")), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(f"unknown config key {key}{hint} (+{key}=VALUE adds a new key)") from None
        # OmegaConf's errors go on with lines of their internals after the first.
        detail = f": {str(cause).splitlines()[0]}" if cause is not None else ""
        raise ValueError(_one_line(str(e)) + detail) from None


def _typed_key(full_key: str, overrides: list[str]) -> str:
    """The key of the override that made OmegaConf fail at ``full_key`` (``a[0].b`` there, ``a.0.b`` here)."""
    dotted = full_key.replace("[", ".").replace("]", "")
    for override in overrides:
        key = _key(override)
        if key == dotted or key.startswith(dotted + "."):
            return key
    return dotted


def _known_keys(config_name: str, overrides: list[str], with_hydra: bool) -> list[str]:
    """Every dotted key of the config composed from ``overrides`` (or from none, if they fail too)."""
    try:
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=with_hydra)
    except HydraException:
        cfg = compose(config_name=config_name, return_hydra_config=with_hydra)
    return list(_dotted_keys(OmegaConf.to_container(cfg, resolve=False)))


def _dotted_keys(node: Any, prefix: str = "") -> Iterator[str]:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for name, child in items:
        key = f"{prefix}{name}"
        yield key
        yield from _dotted_keys(child, key + ".")


def _one_line(message: str) -> str:
    """Hydra's message on one line, without its pointers to documentation and search paths."""
    lines = []
    for line in message.splitlines():
        if line.startswith(("See https://", "Config search path")):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines)
