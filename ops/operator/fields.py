"""Typed reads of one mapping of a SplitserveCluster spec; every failure is a SpecError naming the field's path."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NoReturn


class SpecError(ValueError):
    """A spec that cannot be rendered; str() is one line starting with the field's path."""


# Kubernetes quantities such as 500m, 2, 1.5Gi, 1e3: checked here so a typo fails before the API server's rejection.
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[numkKMGTPE]|[KMGTPE]i)?$")


class Fields:
    """Typed reads of one mapping of the spec; every failure names the field's full path."""

    def __init__(self, raw: Any, path: str) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise SpecError(f"{path}: must be an object, got {type(raw).__name__}")
        self.raw: Mapping[str, Any] = raw
        self.path = path

    def fail(self, key: str | None, message: str) -> NoReturn:
        where = self.path if key is None else f"{self.path}.{key}"
        raise SpecError(f"{where}: {message}")

    def allow(self, *keys: str) -> None:
        unknown = sorted(set(self.raw) - set(keys))
        if unknown:
            self.fail(unknown[0], f"unknown field (known: {', '.join(sorted(keys))})")

    def child(self, key: str, *, required: bool = False) -> Fields:
        if required and key not in self.raw:
            self.fail(key, "is required")
        return Fields(self.raw.get(key), f"{self.path}.{key}")

    def text(self, key: str, default: str | None) -> str:
        value = self.optional_text(key)
        if value is not None:
            return value
        if default is None:
            self.fail(key, "is required")
        return default

    def optional_text(self, key: str) -> str | None:
        value = self.raw.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be a non-empty string, got {value!r}")
        return str(value)

    def integer(self, key: str, default: int | None, *, minimum: int) -> int:
        value = self.optional_integer(key, minimum=minimum)
        if value is not None:
            return value
        if default is None:
            self.fail(key, "is required")
        return default

    def optional_integer(self, key: str, *, minimum: int) -> int | None:
        value = self.raw.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be an integer, got {value!r}")
        if value < minimum:
            self.fail(key, f"must be >= {minimum}, got {value}")
        return int(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {value!r}")
        return bool(value)

    def quantity(self, key: str) -> str:
        value = self.raw.get(key)
        if value is None:
            self.fail(key, "is required")
        text = str(value)
        if isinstance(value, bool) or not isinstance(value, int | float | str) or not QUANTITY.match(text):
            self.fail(key, f"must be a Kubernetes quantity such as 500m or 2Gi, got {value!r}")
        return text

    def quantity_map(self, key: str) -> dict[str, str]:
        quantities = self.child(key)
        return {name: quantities.quantity(name) for name in quantities.raw}

    def string_map(self, key: str) -> dict[str, str]:
        values = self.child(key).raw
        for name, value in values.items():
            if not isinstance(value, str):
                self.fail(f"{key}.{name}", f"must be a string, got {value!r}")
        return dict(values)

    def string_list(self, key: str) -> list[str]:
        values = self.raw.get(key) or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            self.fail(key, f"must be a list of strings, got {values!r}")
        return list(values)
