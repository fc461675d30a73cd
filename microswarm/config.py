"""`--config FILE`: daemon settings from a TOML file (`microswarm.toml`); flags override it.

The file has one table per daemon; keys are the long options without the dashes (`-` or `_`):

    [coordinator]
    listen = "0.0.0.0:7070"
    http = "127.0.0.1:8080"
    dispatch = "least_loaded"
    advertise = true

    [agent]
    coordinator = "coordinator.lan:7070"   # or: discover = true
    slots = 2
    max_cpu = 50          # percent of the machine
    max_memory = "2GiB"
    max_job_cpu = 600     # CPU seconds per job
    idle_only = true
    idle_wait = 60

`MICROSWARM_CONFIG` names the file when `--config` is not given. A key the command does not
know is an error that lists the ones it does.
"""
from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

SKIP = {"help", "config", "func", "config_section"}


def _subparser(parser: argparse.ArgumentParser, names: list[str]) -> argparse.ArgumentParser:
    p = parser
    for name in names:
        sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
        p = sub.choices[name]
    return p


def _convert(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    flag = action.option_strings[-1] if action.option_strings else key
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {key} must be true or false (it is {flag})")
        return value
    if isinstance(value, (dict, list)):
        raise ValueError(f"{where}: {key} must be a single value, not a {type(value).__name__}")
    if action.type is not None and not isinstance(value, bool):
        try:
            value = action.type(value)  # type: ignore[misc, operator]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {key} = {value!r} is not valid for {flag}: {exc}") from None
    elif not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: {key} = {value!r} is not valid for {flag}")
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{where}: {key} = {value!r}: choose one of {', '.join(map(str, action.choices))}")
    return value


def load(path: str | Path, section: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The [section] table of `path`, checked against `parser`'s options and converted to their types."""
    path = Path(path).expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
    stray = [k for k, v in data.items() if not isinstance(v, dict)]
    if stray:
        raise ValueError(f"config file {path}: put {', '.join(stray)} under a [coordinator] or [agent] table")
    table = data.get(section, {})
    actions = {a.dest: a for a in parser._actions if a.dest not in SKIP and a.option_strings}
    out = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        if dest not in actions:
            known = ", ".join(sorted(actions))
            raise ValueError(f"config file {path}: [{section}] has no setting {key!r}; known: {known}")
        out[dest] = _convert(actions[dest], key, value, f"config file {path} [{section}]")
    return out


def apply_config(parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace
                 ) -> argparse.Namespace:
    """Re-parse with the file's settings as defaults, so that flags given on the command line win."""
    path = getattr(args, "config", None)
    if not path:
        return args
    names = [args.command] + ([args.action] if getattr(args, "action", None) else [])
    sub = _subparser(parser, names)
    values = load(path, args.config_section, sub)
    sub.set_defaults(**values)
    return parser.parse_args(argv)
