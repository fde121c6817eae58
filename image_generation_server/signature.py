"""
A pipeline wrapper's run method that takes a request model's fields: Hayhooks builds `/run`'s body from it.

Hayhooks makes the run route's request model from the method's signature and the `Args:` of its docstring.
`takes(Model)` gives the method the model's fields as keyword parameters (types, limits and defaults) and their
descriptions as its `Args:`, so that the route's body is the model, and a parameter added to the model is added to
the route. Setting `__signature__` is Python's own way to give a callable a signature it computes (dataclasses and
Hayhooks' YAML wrappers do the same).
"""

import inspect
from collections.abc import Callable
from typing import Any, TypeVar, get_type_hints

from pydantic import BaseModel

F = TypeVar("F", bound=Callable[..., Any])
INDENT = " " * 4


def takes(model: type[BaseModel]) -> Callable[[F], F]:
    """Decorate a run method written as `(self, *, headers=None, **params)` to take `model`'s fields as `params`."""

    def decorate(run: F) -> F:
        own = [p for p in inspect.signature(run).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        hints = get_type_hints(model, include_extras=True)
        fields = [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=inspect.Parameter.empty if field.is_required() else field.default,
                annotation=hints[name],
            )
            for name, field in model.model_fields.items()
        ]
        keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[1:]]
        returns = inspect.signature(run).return_annotation
        run.__signature__ = inspect.Signature([own[0], *fields, *keyword], return_annotation=returns)  # type: ignore[attr-defined]
        args = "\n".join(f"{INDENT}{name}: {field.description}" for name, field in model.model_fields.items())
        run.__doc__ = f"{inspect.cleandoc(run.__doc__ or '')}\n\nArgs:\n{args}\n"
        return run

    return decorate
