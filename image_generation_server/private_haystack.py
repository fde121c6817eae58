"""
Haystack's copy of each pipeline input, skipped for the values that a deep copy gives back as they are.

`Pipeline.run_async` deep-copies every input of every component several times per run, defaults included, through
`haystack.core.pipeline.utils._deepcopy_with_exceptions`, which asks `isinstance(value, Component)` of each value
first. `Component` is a runtime `Protocol`: on Python 3.11 that check costs about 9 µs per value, and an image run
copies about 18 values, a tenth of the server's CPU per image. A value of a type in `AS_IS` is one that
`copy.deepcopy` returns unchanged and that is no component, so handing it over uncopied gives every run what Haystack
would have given it. `docs/upstream.md` holds the Haystack issue that would remove this module; tests/test_upstream.py
checks the names it relies on.
"""

import types
from typing import Any

from haystack.core.pipeline import base, pipeline, utils

# Exact types (not their subclasses) whose values `copy.deepcopy` returns as they are.
AS_IS = frozenset({type(None), bool, int, float, str, bytes, types.FunctionType, types.BuiltinFunctionType})
# The modules that call Haystack's copy: each imported the function under its own name.
COPYING_MODULES = (utils, base, pipeline)
HAYSTACK_COPY = utils._deepcopy_with_exceptions


def copy_value(value: Any) -> Any:
    """Haystack's copy of a pipeline value, or the value itself when its type is in `AS_IS`."""
    return value if type(value) in AS_IS else HAYSTACK_COPY(value)


def skip_copying_immutable_values() -> None:
    """Make Haystack's pipelines (and the copy's own recursion into lists and dicts) copy through `copy_value`."""
    for module in COPYING_MODULES:
        module._deepcopy_with_exceptions = copy_value
