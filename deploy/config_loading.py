"""YAML + dotted command-line overrides → a validated pydantic model, with errors that name the field.

No eval and no silent rewriting: override values are parsed as YAML scalars/lists (``1e-6`` → float,
``[1, 2]`` → list, ``null`` → None), then the whole document is validated once.

A YAML file may start from another one with ``base: other.yaml`` (a path relative to the file): its
mappings are merged key by key over the base's, lists and scalars replace the base's values.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration that fails validation; the message lists every bad field with its reason."""


def apply_overrides(document: dict, overrides: list[str]) -> dict:
    """Set ``a.b.c=value`` entries into a nested dict (a new one; the input is not modified)."""
    result = _deep_copy(document)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. learner.lr=1e-6")
        value = yaml.safe_load(raw) if raw.strip() else None
        node = result
        parts = key.strip().split(".")
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, where=f"override {item!r}: {'.'.join(parts[: depth + 1])}")
        if isinstance(node, list):
            _child(node, parts[-1], where=f"override {item!r}: {key.strip()}")  # checks the index
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value
    return result


def _child(node, part: str, *, where: str):
    """Descend one level: a mapping key (created if missing) or an index into a list written in the file."""
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(f"{where}: no item {part} in a list of {len(node)}")
        return node[int(part)]
    child = node.setdefault(part, {})
    if not isinstance(child, (dict, list)):
        raise ConfigError(f"{where} is not a section")
    return child


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def format_validation_error(error: ValidationError, *, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in error.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {field}: {e['msg']}")
    return "\n".join(lines)


BASE_KEY = "base"


def config_chain(path: str | Path) -> list[Path]:
    """``path`` and the files of its ``base`` chain (resolved), in the order they are read; a chain that loops
    or a file that does not read ends it (loading the config says why)."""
    chain: list[Path] = []
    current = Path(path)
    while current.resolve() not in chain:
        chain.append(current.resolve())
        try:
            loaded = yaml.safe_load(current.read_text())
        except (OSError, yaml.YAMLError):
            break
        base = loaded.get(BASE_KEY) if isinstance(loaded, dict) else None
        if not isinstance(base, str):
            break
        current = current.parent / base
    return chain


def _load_document(path: Path, *, seen: tuple[Path, ...]) -> dict:
    """The YAML mapping of ``path`` merged over its ``base`` chain."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: base chain loops ({' -> '.join(str(p) for p in seen)})")
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory, not a YAML config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    document = loaded or {}
    base = document.pop(BASE_KEY, None)
    if base is None:
        return document
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a YAML file path, got {base!r}")
    return _merged(_load_document(path.parent / base, seen=(*seen, path.resolve())), document)


def _merged(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(model: type[M], path: str | Path | None = None, overrides: list[str] | None = None) -> M:
    """Load ``path`` (YAML; None = all defaults), apply ``overrides``, validate into ``model``."""
    document: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        document = _load_document(Path(path), seen=())
    document = apply_overrides(document, overrides or [])
    try:
        return model.model_validate(document)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source=source)) from None
