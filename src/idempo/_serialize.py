"""How ``@idempotent`` stores a result and fingerprints a call: the :class:`Serializer` protocol, the default
:class:`JSONSerializer` (which brings back what it stored, whatever the annotation), and
:func:`fingerprint_arguments`. Public through :mod:`idempo.decorators`.
"""

from __future__ import annotations

import base64
import collections.abc
import dataclasses
import datetime
import decimal
import enum
import hashlib
import json
import types
import typing
import uuid
import zoneinfo
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ["JSONSerializer", "Serializer", "fingerprint_arguments"]


@runtime_checkable
class Serializer(Protocol):
    """**Protocol:** how ``@idempotent`` stores a return value, and rebuilds it for a repeat.

    ``dumps`` raises ``TypeError`` (or ``ValueError``) for a value it cannot store. ``loads`` is given the
    function's resolved return annotation (``typing.Any`` when it has none, the awaited type for a coroutine
    function) so that it can rebuild the same type.
    """

    def dumps(self, value: Any) -> bytes:
        """The bytes to store for *value*."""
        ...

    def loads(self, data: bytes, annotation: Any) -> Any:
        """The value *data* stands for, as the type *annotation* says where it can."""
        ...


class JSONSerializer:
    """The default :class:`Serializer`: compact UTF-8 JSON that brings back what it stored.

    JSON values are written as they are. So that a result comes back as it was returned, whatever the annotation,
    ``datetime``, ``date``, ``time`` and ``timedelta`` (time zones kept: a ``zoneinfo`` zone by its name, any
    other by its offset), ``UUID``, ``Decimal``, ``bytes`` and ``bytearray``, ``complex``, ``tuple``, ``set`` and
    ``frozenset``, and dicts whose keys are not all strings (or that hold the tag key itself) are written as
    one-key objects ``{"__idempo__": [type, value]}`` and rebuilt. Pydantic models (``model_dump(mode="json")``),
    dataclasses (their fields) and enums (their values) are written as JSON and rebuilt as the return annotation
    says where it names them (also inside ``list[...]``, ``dict[..., ...]``, ``tuple[...]``, ``set[...]`` and
    ``X | None``), as are named tuples. Anything else raises ``TypeError``: ``@idempotent`` then keeps the key
    done without its result (a repeat raises :class:`~idempo.ResponseNotStoredError`), so pass another
    serializer for such results.
    """

    def dumps(self, value: Any) -> bytes:
        """See :meth:`Serializer.dumps`."""
        return json.dumps(_tagged(value, 0), ensure_ascii=False, separators=(",", ":")).encode()

    def loads(self, data: bytes, annotation: Any) -> Any:
        """See :meth:`Serializer.loads`."""
        return _rebuild(annotation, json.loads(data, object_hook=_untag))


def _is_pydantic_model(value: Any) -> bool:
    # Duck-typed, so that idempo never imports pydantic.
    return hasattr(value, "model_dump") and hasattr(type(value), "model_validate")


_TAG = "__idempo__"
_MAX_DEPTH = 500  # deeper than any result worth storing; json would hit the recursion limit anyway


def _tag(kind: str, value: Any) -> dict[str, Any]:
    return {_TAG: [kind, value]}


def _tagged(value: Any, depth: int) -> Any:
    """*value* as JSON data, with the types JSON lacks written as tagged objects (see :class:`JSONSerializer`)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if depth > _MAX_DEPTH:
        msg = "a return value nested this deep cannot be stored as JSON"
        raise ValueError(msg)
    depth += 1
    if isinstance(value, enum.Enum):
        return _tagged(value.value, depth)
    for plain in (bool, str, int, float):  # a subclass (an enum was handled above): stored as its plain value
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, list):
        return [_tagged(item, depth) for item in value]
    if isinstance(value, dict):
        if all(type(name) is str for name in value) and _TAG not in value:
            return {name: _tagged(item, depth) for name, item in value.items()}
        return _tag("dict", [[_tagged(name, depth), _tagged(item, depth)] for name, item in value.items()])
    if isinstance(value, tuple):
        if hasattr(value, "_fields"):  # a named tuple: rebuilt from the annotation, like a dataclass
            return [_tagged(item, depth) for item in value]
        return _tag("tuple", [_tagged(item, depth) for item in value])
    if isinstance(value, set | frozenset):
        items = sorted((_tagged(item, depth) for item in value), key=_dumps)
        return _tag("frozenset" if isinstance(value, frozenset) else "set", items)
    if isinstance(value, datetime.datetime):
        zone = value.tzinfo.key if isinstance(value.tzinfo, zoneinfo.ZoneInfo) else None
        return _tag("datetime", [value.replace(tzinfo=None).isoformat() if zone else value.isoformat(), zone])
    if isinstance(value, datetime.date):
        return _tag("date", value.isoformat())
    if isinstance(value, datetime.time):
        return _tag("time", value.isoformat())
    if isinstance(value, datetime.timedelta):
        return _tag("timedelta", [value.days, value.seconds, value.microseconds])
    if isinstance(value, uuid.UUID):
        return _tag("uuid", str(value))
    if isinstance(value, decimal.Decimal):
        return _tag("decimal", str(value))
    if isinstance(value, bytes | bytearray):
        return _tag("bytes" if isinstance(value, bytes) else "bytearray", base64.b64encode(value).decode("ascii"))
    if isinstance(value, complex):
        return _tag("complex", [value.real, value.imag])
    if not isinstance(value, type):
        if _is_pydantic_model(value):
            return _tagged(value.model_dump(mode="json"), depth)
        if dataclasses.is_dataclass(value):
            return {field.name: _tagged(getattr(value, field.name), depth) for field in dataclasses.fields(value)}
    msg = f"a return value of type {type(value).__qualname__} cannot be stored as JSON; pass serializer="
    raise TypeError(msg)


def _untag(document: dict[str, Any]) -> Any:
    """The ``object_hook`` that rebuilds what :func:`_tagged` tagged; other objects are left as they are."""
    if len(document) != 1 or _TAG not in document:
        return document
    kind, value = document[_TAG]
    rebuild = _UNTAG.get(kind)
    if rebuild is None:
        msg = f"unknown tagged value {kind!r} in a stored result"
        raise ValueError(msg)
    return rebuild(value)


def _datetime(value: list[Any]) -> datetime.datetime:
    text, zone = value
    moment = datetime.datetime.fromisoformat(text)
    return moment.replace(tzinfo=zoneinfo.ZoneInfo(zone)) if zone else moment


_UNTAG: dict[str, Callable[[Any], Any]] = {
    "dict": lambda items: {_hashable(name): item for name, item in items},
    "tuple": tuple,
    "set": lambda items: {_hashable(item) for item in items},
    "frozenset": lambda items: frozenset(_hashable(item) for item in items),
    "datetime": _datetime,
    "date": datetime.date.fromisoformat,
    "time": datetime.time.fromisoformat,
    "timedelta": lambda parts: datetime.timedelta(days=parts[0], seconds=parts[1], microseconds=parts[2]),
    "uuid": uuid.UUID,
    "decimal": decimal.Decimal,
    "bytes": base64.b64decode,
    "bytearray": lambda text: bytearray(base64.b64decode(text)),
    "complex": lambda parts: complex(parts[0], parts[1]),
}


def _hashable(value: Any) -> Any:
    """A list that was a tuple's JSON form inside a set or a dict key, back as a tuple (a list is unhashable)."""
    return tuple(_hashable(item) for item in value) if isinstance(value, list) else value


def _rebuild(annotation: Any, value: Any) -> Any:
    """*value*, decoded from JSON, as *annotation* says: models and dataclasses rebuilt, containers recursed."""
    if value is None or annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin is None:
        if not isinstance(annotation, type):
            return value
        if hasattr(annotation, "model_validate") and hasattr(annotation, "model_dump"):
            return annotation.model_validate(value)
        if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
            try:
                hints = typing.get_type_hints(annotation)
            except Exception:  # noqa: BLE001 - unresolvable field types: leave those fields as JSON
                hints = {}
            init_fields = (field for field in dataclasses.fields(annotation) if field.init and field.name in value)
            return annotation(
                **{field.name: _rebuild(hints.get(field.name, Any), value[field.name]) for field in init_fields}
            )
        if isinstance(value, list | tuple) and issubclass(annotation, tuple | set | frozenset):
            return annotation(*value) if hasattr(annotation, "_fields") else annotation(value)  # a NamedTuple
        if issubclass(annotation, enum.Enum):
            return annotation(value)
        return value
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _rebuild(args[0], value)
    if origin is typing.Union or origin is types.UnionType:
        options = [arg for arg in args if arg is not type(None)]
        return _rebuild(options[0], value) if len(options) == 1 else value
    if isinstance(value, list | tuple | set | frozenset):
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_rebuild(args[0], item) for item in value)
            if len(args) == len(value):
                return tuple(_rebuild(arg, item) for arg, item in zip(args, value, strict=True))
            return tuple(value)
        item_type = args[0] if args else Any
        if origin in (set, frozenset):
            return origin(_rebuild(item_type, item) for item in value)
        if origin in (list, collections.abc.Sequence, collections.abc.MutableSequence, collections.abc.Iterable):
            return [_rebuild(item_type, item) for item in value]
        return value
    if isinstance(value, dict) and origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        value_type = args[1] if len(args) == 2 else Any
        return {name: _rebuild(value_type, item) for name, item in value.items()}
    return value


def _canonical(value: Any) -> Any:
    """*value* as plain JSON data, the same for equal arguments in any process."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_canonical(item) for item in value]
    if isinstance(value, Mapping):
        return {
            item_key if isinstance(item_key, str) else _dumps(_canonical(item_key)): _canonical(item)
            for item_key, item in value.items()
        }
    if isinstance(value, set | frozenset):
        return sorted((_canonical(item) for item in value), key=_dumps)
    if not isinstance(value, type):
        if _is_pydantic_model(value):
            return _canonical(value.model_dump(mode="json"))
        if dataclasses.is_dataclass(value):
            return {field.name: _canonical(getattr(value, field.name)) for field in dataclasses.fields(value)}
    kind = type(value)
    # "<Session object at 0x7f...>": an address means nothing to a retry, so such an object counts by its type.
    if getattr(kind, "__repr__", None) is object.__repr__:
        return f"<{kind.__module__}.{kind.__qualname__}>"
    return repr(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint_arguments(arguments: Mapping[str, Any]) -> str:
    """The fingerprint ``@idempotent`` gives a call: SHA-256 (64 hex characters) of the canonical JSON of its
    bound arguments (see the module's documentation for how each kind of value counts)."""
    return hashlib.sha256(_dumps(_canonical(dict(arguments))).encode("utf-8", "surrogatepass")).hexdigest()
