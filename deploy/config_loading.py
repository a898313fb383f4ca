"""YAML + dotted command-line overrides → a validated pydantic model, with errors that name the field.

No eval and no silent rewriting: override values are parsed as YAML scalars/lists (``1e-6`` → float,
``[1, 2]`` → list, ``null`` → None), then the whole document is validated once. A mapping value
(``train={steps: 3, mode: sync}``) is merged key by key into the section, like a ``base:`` file.

A YAML file may start from another one with ``base: other.yaml`` (a path relative to the file): its
mappings are merged key by key over the base's, lists and scalars replace the base's values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration that fails validation; the message lists every bad field with its reason."""


def apply_overrides(document: dict, overrides: list[str], *, defaults: dict | None = None) -> dict:
    """Set ``a.b.c=value`` entries into a nested dict (a new one; the input is not modified).

    ``defaults``: the model's default document. A key or index into a section the document leaves at its default
    (``curriculum.stages.2.reward_weights.overlong=1`` with no ``stages`` written, ``rewards.default_weights.iou=2``)
    starts from that default.
    """
    result = _deep_copy(document)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. learner.lr=1e-6")
        value = _override_value(item, raw)
        node, default = result, defaults
        parts = key.strip().split(".")
        for depth, part in enumerate(parts[:-1]):
            where = f"override {item!r}: {'.'.join(parts[: depth + 1])}"
            node, default = _child(node, part, default=default, next_part=parts[depth + 1], where=where)
        # A mapping is merged key by key into the section it names, as `base:` merges: `train={steps: 3}` (or
        # `curriculum.stages.2={name: x}`) replacing the whole section would silently reset every other field of
        # it (and, under `refocus submit`, the run name and cluster address set before the user's overrides).
        # A section the document leaves at its default is merged into that default.
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override {item!r}: {key.strip()}: no item {last} in a list of {len(node)}")
            last = int(last)
            current = node[last]
        else:
            current = node[last] if last in node else _deep_copy(default.get(last)) if isinstance(default, dict) \
                else None
        node[last] = _merged(current, value) if isinstance(value, dict) and isinstance(current, dict) else value
    return result


def _override_value(item: str, raw: str):
    """The YAML value of an override. A comment is refused rather than dropped: ``train.output_dir=runs/a #2``
    would otherwise set ``runs/a``."""
    if not raw.strip():
        return None
    try:
        node = yaml.compose(raw)
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]}); "
                          f"quote it if it is a string") from None
    if node is None or node.end_mark.index < len(raw.rstrip()):
        raise ConfigError(f"override {item!r}: ' #' starts a YAML comment, which would be dropped; quote the "
                          f"value if the '#' belongs to it")
    return value


def _child(node, part: str, *, default, next_part: str, where: str):
    """Descend one level: (child, its default). A mapping key is created if missing (from ``default`` when
    the next part indexes a list); an index must name an item of the list."""
    default_child = None
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(f"{where}: no item {part} in a list of {len(node)}")
        child = node[int(part)]
        if isinstance(default, list) and int(part) < len(default):
            default_child = default[int(part)]
    else:
        default_child = default.get(part) if isinstance(default, dict) else None
        if part not in node and isinstance(default_child, (dict, list)):
            # A key set into a section left at its default changes that key, not the whole default: a dict field
            # (`rewards.default_weights.iou=2`) keeps its other keys, a list (`stages.2....`) its other items.
            node[part] = _deep_copy(default_child)
        if node.get(part) is None:  # missing, or a section that is off by default (rewards.overlong: null)
            node[part] = {}
        child = node[part]
    if not isinstance(child, (dict, list)):
        raise ConfigError(f"{where} is not a section")
    return child, default_child


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
    document = apply_overrides(document, overrides or [], defaults=_defaults(model))
    try:
        config = model.model_validate(document)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source=source)) from None
    coerced = _numbers_read_as_bools(document, config)
    if coerced:
        raise ConfigError(f"invalid configuration ({source}):\n" + "\n".join(f"  {c}" for c in coerced))
    return config


def _defaults(model: type[M]) -> dict | None:
    """The document of ``model``'s defaults (None when some field has none)."""
    try:
        return model.model_validate({}).model_dump(mode="json")
    except ValidationError:
        return None


def _numbers_read_as_bools(document, value, path: str = "") -> list[str]:
    """Fields where pydantic's lax mode turned a bool into a number or a number into a bool (``steps: true``
    → 1, ``dynamic_sampling: 1`` → True): such a value is refused, not rewritten."""
    problems = []
    if isinstance(document, dict) and isinstance(value, BaseModel):
        for key, item in document.items():
            if isinstance(key, str) and key in type(value).model_fields:
                problems += _numbers_read_as_bools(item, getattr(value, key), f"{path}{key}.")
    elif isinstance(document, dict) and isinstance(value, dict):
        for key, item in document.items():
            if key in value:
                problems += _numbers_read_as_bools(item, value[key], f"{path}{key}.")
    elif isinstance(document, list) and isinstance(value, (list, tuple)) and len(document) == len(value):
        for index, (item, validated) in enumerate(zip(document, value)):
            problems += _numbers_read_as_bools(item, validated, f"{path}{index}.")
    elif isinstance(document, bool) != isinstance(value, bool) and isinstance(value, (int, float)):
        expected = "true or false" if isinstance(value, bool) else "a number"
        problems.append(f"{path[:-1]}: expected {expected}, got {json.dumps(document)}")
    return problems
