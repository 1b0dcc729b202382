"""Name -> constructor registries, as timm's ``create_model``: configs name a component, the
registry builds it and checks its arguments, so a typo fails with the allowed names."""
from __future__ import annotations

import importlib
import inspect
import typing
from typing import Any, Callable, Iterable

from pydantic import TypeAdapter, ValidationError


class ConfigError(ValueError):
    """A config names something that does not exist or gives it a bad value."""


class Registry:
    """A named collection of constructors for one kind of component (models, losses, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
            key = name or obj.__name__
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is registered twice "
                                 f"({self._items[key].__module__} and {obj.__module__}); rename one")
            self._items[key] = obj
            return obj
        return decorator

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._items[name]

    def parameters(self, name: str) -> dict[str, inspect.Parameter]:
        fn = self.get(name)
        target = fn.__init__ if inspect.isclass(fn) else fn
        params = dict(inspect.signature(target).parameters)
        params.pop("self", None)
        return params

    def build(self, name: str, params: dict[str, Any] | None = None, *,
              injected: Iterable[str] = (), where: str = "", **context: Any) -> Any:
        """Build ``name`` with user ``params`` plus ``context`` the caller supplies (e.g. class
        counts). Context keys the constructor does not take are dropped; an unknown user key is a
        ConfigError naming the allowed ones."""
        params = dict(params or {})
        signature = self.parameters(name)
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
        user_allowed = sorted(k for k, p in signature.items()
                              if k not in context and k not in injected
                              and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD))
        for key in params:
            if key in context:
                raise ConfigError(f"{where or self.kind}.{key} is set by longtail itself and cannot be configured")
            if not accepts_any and key not in signature:
                raise ConfigError(f"unknown key {where + '.' if where else ''}{key} for {self.kind} {name!r}; "
                                  f"allowed: {', '.join(user_allowed) or '(none)'}")
        self._check_types(name, params, where)
        kwargs = {k: v for k, v in context.items() if accepts_any or k in signature}
        kwargs.update(params)
        try:
            return self.get(name)(**kwargs)
        except ConfigError:
            raise
        except (ValueError, TypeError) as error:  # the constructor's own checks of the user's values
            if not params:
                raise
            raise ConfigError(f"{where or self.kind + ' parameters'} of {name}: {error}") from None

    def _check_types(self, name: str, params: dict[str, Any], where: str) -> None:
        """User values must fit the constructor's annotations (``gamma=abc`` for a float fails here,
        not at the first training step)."""
        fn = self.get(name)
        try:
            hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
        except Exception:  # noqa: BLE001 - unresolvable annotations are not checked
            return
        for key, value in params.items():
            if key not in hints:
                continue
            try:
                TypeAdapter(hints[key]).validate_python(value)
            except ValidationError as error:
                reason = error.errors()[0]["msg"]
                raise ConfigError(f"{where + '.' if where else ''}{key}={value!r} for {self.kind} {name!r}: "
                                  f"{reason}") from None
            except Exception:  # noqa: BLE001 - a type pydantic cannot check (a tensor, a module)
                continue


DATASETS = Registry("dataset")
MODELS = Registry("model")
LOSSES = Registry("loss")
SAMPLERS = Registry("sampler")
CALIBRATORS = Registry("calibrator")
STAGE2 = Registry("stage2 method")
HEADS = Registry("head kind")  # how a saved stage-2 checkpoint rebuilds its heads (models.heads)

ALL = {"datasets": DATASETS, "models": MODELS, "losses": LOSSES, "samplers": SAMPLERS,
       "calibrators": CALIBRATORS, "stage2": STAGE2, "heads": HEADS}

_PACKAGES = ("longtail.data", "longtail.models", "longtail.losses", "longtail.calibration", "longtail.stage2")


def load_all() -> None:
    """Import every package that registers components, so the registries are complete."""
    for package in _PACKAGES:
        importlib.import_module(package)
