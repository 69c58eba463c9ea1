"""Registries of the pluggable concepts a config names: schedules, DP algorithms, codecs.

A registry lives here, in the base layer, so that `jaxpipe.config` can list and check the choices
without importing the layers above it. The classes fill it: each home module decorates its classes
with `REGISTRY.register`, and the registry imports its home (by name, once) the first time it is
asked, so data flows one way: upper layers register into the base, never the reverse.

Every registered class carries

- `name: ClassVar[str]`: the value a config key takes;
- `validate_config(cfg)` (a classmethod): the rules of its own keys, raising `ConfigError` with what
  to change; `config.validate` calls it for the class each key selects, before anything compiles.

Adding a schedule, a DP algorithm or a codec is therefore one new class in its home module.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from jaxpipe.errors import ConfigError

if TYPE_CHECKING:
    from jaxpipe.config import Config


class Registered(Protocol):
    name: str

    @classmethod
    def validate_config(cls, cfg: Config) -> None: ...


T = TypeVar("T")


class Registry(Generic[T]):
    """The classes one config key chooses between, in registration order."""

    def __init__(self, key: str, home: str, what: str):
        self.key, self.home, self.what = key, home, what
        self._classes: dict[str, type[T]] = {}
        self._loaded = False

    def register(self, cls: type[T]) -> type[T]:
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name or name == "?":
            raise TypeError(f"{cls.__name__} needs a `name` to be registered as a {self.what}")
        if name in self._classes and self._classes[name] is not cls:
            raise TypeError(f"two {self.what}s are called {name!r}: {self._classes[name].__name__} and {cls.__name__}")
        self._classes[name] = cls
        return cls

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self.home)

    def names(self) -> tuple[str, ...]:
        self._load()
        return tuple(self._classes)

    def get(self, name: str, key: str | None = None) -> type[T]:
        """The class registered as `name`; a ConfigError naming `key` (default: the registry's own,
        another where a second key chooses from the same classes) and the choices if there is none."""
        self._load()
        if name not in self._classes:
            raise ConfigError(f"{key or self.key}: {name!r} is not one of {', '.join(map(repr, self._classes))}")
        return self._classes[name]

    def validate(self, name: str, cfg: Config, key: str | None = None) -> None:
        """The chosen class's own rules (`validate_config`), after checking that it exists."""
        cls: Any = self.get(name, key)
        check = getattr(cls, "validate_config", None)
        if check is not None:
            check(cfg)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._classes

    def __iter__(self) -> Iterator[type[T]]:
        self._load()
        return iter(list(self._classes.values()))

    def __len__(self) -> int:
        self._load()
        return len(self._classes)


SCHEDULES: Registry[Any] = Registry("parallel.schedule", "jaxpipe.pipeline.schedule", "schedule")
DP_ALGORITHMS: Registry[Any] = Registry("parallel.dp_mode", "jaxpipe.dp.algorithms", "DP algorithm")
ACT_CODECS: Registry[Any] = Registry("parallel.act_codec", "jaxpipe.comm.codec", "pipeline codec")
GRAD_CODECS: Registry[Any] = Registry("parallel.grad_codec", "jaxpipe.comm.quant", "DP gradient codec")
