"""A sharded loss takes its single-device loss's options: written once, checked by name.

``sharded_cross_entropy(logits, targets, *, mesh, class_axis_name, batch_axis_name=None,
**options)`` takes every keyword option of :func:`~jaxsoftmax.cross_entropy` but the ones
a mesh makes moot. :func:`takes_options_of` gives the sharded function the single-device
loss's keyword options: an unknown name raises a ``TypeError`` that lists the options, and
``inspect.signature`` (``help()``) shows them with their defaults, as if written out.
"""

from __future__ import annotations

import functools
import inspect


def keyword_options(base, excluded=()) -> list[inspect.Parameter]:
    """``base``'s keyword-only parameters but ``excluded``."""
    return [
        parameter
        for name, parameter in inspect.signature(base).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in excluded
    ]


def takes_options_of(base, excluded=()):
    """Decorates a sharded loss whose last parameter is ``**options``: the options must be
    keyword options of ``base`` (``excluded`` left out), its signature lists them, and those
    not given take ``base``'s defaults."""

    def decorate(sharded):
        own = inspect.signature(sharded)
        explicit = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
        inherited = [p for p in keyword_options(base, excluded) if p.name not in own.parameters]
        allowed = [p.name for p in inherited]
        defaults = {p.name: p.default for p in inherited}  # base's, as if written out

        @functools.wraps(sharded)
        def checked(*args, **kwargs):
            unknown = sorted(set(kwargs) - set(own.parameters) - set(allowed))
            if unknown:
                raise TypeError(
                    f"{sharded.__name__}() got unexpected keyword arguments {unknown}. Besides "
                    f"its mesh arguments it takes {base.__name__}'s options: "
                    f"{', '.join(allowed)}."
                )
            return sharded(*args, **{**defaults, **kwargs})

        checked.__signature__ = own.replace(parameters=explicit + inherited)
        return checked

    return decorate


def array_options(options: dict) -> list:
    """The options that are arrays (masks, weights, biases, labels): those whose layout on
    the mesh decides how the loss runs (:func:`jaxsoftmax.tiles.mesh.on_explicit_axes`)."""
    return [value for value in options.values() if hasattr(value, "shape")]
