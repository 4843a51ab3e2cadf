"""How a config model is declared, and how its errors read: one line naming the key path.

Every section of pipeline.yaml is a pydantic model deriving from :class:`Keys`: strict types (YAML's
``"8"`` is not an integer, ``true`` is not a number), unknown keys refused, and each field's description
as its help text (the CLI's flags and docs/configuration.md are generated from it). A value's range is a
:func:`rule` on its type, so a field reads as what it accepts. pydantic reports every failure with its
location; :func:`one_line` turns the first into the line the CLI prints (``train.runs[1].lr: nan must be
positive``), and a model's own cross-key check raises :class:`~matryoshka.errors.ConfigError` naming
its key (``source: run 'a' names no source array``), which gets the model's path in front.
"""
from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError

from .errors import ConfigError


def opt(default: Any, help: str) -> Any:
    """A config field with its help text, shown by the CLI and docs/configuration.md (generated from it)."""
    return Field(default, description=help)


def rule(ok: Callable[[Any], bool], wording: str) -> AfterValidator:
    """A check of one value; its failure reads ``key: value wording`` (``lr: nan must be positive``)."""

    def check(value: Any) -> Any:
        if not ok(value):
            raise PydanticCustomError("rule", wording)
        return value

    return AfterValidator(check)


def _keep_int(value: Any, handler: Callable[[Any], Any]) -> Any:
    """An integer given for a number stays an integer: ``noise: 0`` is written to a cache's identity (and a
    run's config.json) as ``0``, as it always was, so its fingerprint does not change."""
    out = handler(value)
    return value if type(value) is int else out


Number = Annotated[float, WrapValidator(_keep_int)]
"""A number: an integer or a float as given (never true/false, never text)."""


class Keys(BaseModel):
    """A mapping of config keys. Built directly (``TrainConfig(...)``) it raises a one-line ConfigError too,
    naming keys under ``section`` (``train.runs[0].arch``)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, protected_namespaces=())
    section: ClassVar[str] = ""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise Invalid(type(self), e, self.section) from None

    @classmethod
    def default_of(cls, key: str) -> Any:
        """The default value of ``key`` (a pydantic model has no class attribute per field)."""
        return cls.model_fields[key].default


def from_dict(cls: type[Keys], data: Any, path: str) -> Any:
    """Build a config model from a YAML mapping; every error is one line naming its key under ``path``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise Invalid(cls, e, path) from None


class Invalid(ConfigError):
    """A config model's validation failure as one line (:func:`one_line`). pydantic builds a model held by
    another (``train.runs[1]``) through its ``__init__`` too, so the failure keeps pydantic's errors: the
    model holding it names them again under its own path."""

    def __init__(self, model: type[BaseModel], error: ValidationError, path: str) -> None:
        super().__init__(one_line(model, error, path))
        self.model, self.error = model, error

    def __reduce__(self) -> tuple:
        return ConfigError, (str(self),)  # its line, across processes (pydantic's errors need not pickle)


_EXPECTED = {"int_type": "an integer", "float_type": "a number", "string_type": "a string", "bool_type": "true/false",
             "list_type": "a list", "model_type": "a mapping", "dict_type": "a mapping",
             "model_attributes_type": "a mapping", "none_required": "null"}
"""What a value of the wrong type should have been, by pydantic's error type."""


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config model a field holds (``list[RunConfig]``, ``SyntheticConfig | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _locate(cls: type[BaseModel], loc: tuple, unknown: bool) -> tuple[str, type[BaseModel], Any]:
    """pydantic's location as a key path (``runs[1].target``) without its union-member tags (``int``,
    ``list[int]``), the model holding the last key, and that key's field (None for an unknown key, the last
    item of ``loc`` when ``unknown``)."""
    path, model, holder, field = "", cls, cls, None
    for i, item in enumerate(loc):
        if isinstance(item, int):
            path += f"[{item}]"
        elif model is not None and (item in model.model_fields or (unknown and i == len(loc) - 1)):
            path += f".{item}" if path else item
            holder, field = model, model.model_fields.get(item)
            model = _model_in(field.annotation) if field is not None else None
        # else: the tag of the union member pydantic tried; not a key
    return path, holder, field


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path and key else path or key


def _allows_null(field: Any) -> bool:
    return field is not None and type(None) in typing.get_args(field.annotation)


def one_line(cls: type[BaseModel], error: ValidationError, path: str) -> str:
    """The first failure of ``error`` as one line: an unknown key first, then a value of the wrong type
    (every type a union accepts named), then the first other failure in the order of the keys."""
    errors = error.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), None) \
        or next((e for e in errors if e["type"] in _EXPECTED), None) or errors[0]
    key, holder, field = _locate(cls, first["loc"], first["type"] == "extra_forbidden")
    where, value = _join(path, key), first["input"]
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown key; valid keys are {', '.join(sorted(holder.model_fields))}"
    if first["type"] in _EXPECTED:
        same = [e for e in errors if e["type"] in _EXPECTED and _locate(cls, e["loc"], False)[0] == key]
        words = list(dict.fromkeys(_EXPECTED[e["type"]] for e in same))
        if _allows_null(field) and not key.endswith("]") and "null" not in words:
            words.append("null")
        return f"{where}: {value!r} is {_a(type(value).__name__)}; expected {' or '.join(words)}"
    if first["type"] == "rule":
        return f"{where}: {value!r} {first['msg']}"
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, Invalid):  # a model held by this one, built through its __init__
        return one_line(cause.model, cause.error, where)
    if isinstance(cause, ConfigError):  # a model's own check, naming a key of that model
        return _join(where, str(cause))
    return f"{where}: {value!r}: {first['msg']}"


def _a(noun: str) -> str:
    """``a str``, ``an int``."""
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
