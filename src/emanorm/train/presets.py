"""The text a config is read from: presets by name, YAML files by path, and ``KEY=VALUE``.

Safe loading only (``yaml.safe_load``: nothing read runs code); every failure is one ``UserError``
line naming the file or the value. Imports no torch (the CLI reads presets before torch loads).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from emanorm.errors import UserError
from emanorm.train.schema import suggestion

__all__ = ["load_config_source", "parse_key_value", "parse_value", "preset_names"]


# -- presets and files -----------------------------------------------------------------------------
def preset_names() -> list[str]:
    folder = resources.files("emanorm") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise UserError(f"invalid YAML in {where}: nested too deeply") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"invalid YAML in {where}{line}: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{where} must hold a YAML mapping of options, got {type(data).__name__}")
    return data


def load_config_source(name_or_path: str) -> dict[str, Any]:
    """A preset by name (``small-fixmatch``) or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"config file {path} is not YAML text (byte {err.start} is not UTF-8)") from None
        except OSError as err:
            raise UserError(f"cannot read config file {path}: {err.strerror or err}") from None
        return _read_yaml(text, str(path))
    names = preset_names()
    if name_or_path not in names:
        raise UserError(
            f"unknown preset {name_or_path!r}{suggestion(name_or_path, names)}; "
            f"presets: {', '.join(names)} (or a .yaml path)"
        )
    text = (resources.files("emanorm") / "configs" / f"{name_or_path}.yaml").read_text()
    return _read_yaml(text, f"preset {name_or_path}")


# -- key=value -------------------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    """A config value as ``emanorm train --set`` reads it (YAML: numbers, booleans, null, lists, maps)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise UserError(f"cannot parse the value {text!r}") from None


def parse_key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> ``(key, YAML value)``; dashes in KEY become underscores. The one parser of
    ``--set``, ``--method-arg``, ``compare --set`` and the benchmarks' ``--set``."""
    if "=" not in text:
        raise UserError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), parse_value(value)
