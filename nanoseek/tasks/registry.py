"""The one list of task families: `get_task`, the held-out split and the corpus all look families up here.

A family is a `Task` subclass in a module of its own (chain_sum.py is the model to copy) that declares itself
with `@register`. The package imports its own family modules (tasks/__init__.py), so they are registered
before anything asks; a family defined outside the package (a test, a user's script) registers the same way
and is then usable everywhere a family name is, with no library file edited.

This module sits below base.py: base's `problem_key` asks `family_key` for the split key, so the registry
holds classes and calls their declarations without importing the Task interface itself.
"""

from __future__ import annotations

import inspect

from .verify import ANSWER_FORMS

# name -> family class, in registration order (the order the CLI lists them in). The one module-level table that
# changes: family modules fill it as they are imported, and nothing removes from it (a test that registers a family
# for a while puts the table back as it found it).
TASKS: dict = {}


def register(cls):
    """Class decorator: add a family under `cls.name`. A second class under a taken name is refused (a typo or a
    clash would otherwise silently replace a family and its split keys); registering the same class again is a
    no-op."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{cls.__name__}: a family needs a `name` that is an identifier, got {name!r}")
    if TASKS.get(name, cls) is not cls:
        raise ValueError(f"task family {name!r} is already registered by {TASKS[name].__qualname__}")
    if cls.answer_form not in ANSWER_FORMS:
        raise ValueError(f"task family {name!r}: answer_form {cls.answer_form!r} is not one of {ANSWER_FORMS}")
    TASKS[name] = cls
    return cls


def family(name: str):
    """The registered class of a family name (ValueError listing the families if there is none)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]


def get_task(name: str, **options):
    """The family's task at its curriculum knobs (`cls.knobs`), overridden by `options`.

    Families are built by keyword, so a constructor with its own named parameters (StartsWithTask(chars)) works
    as well as the reasoning-gym families' **options; a missing or unknown parameter is a ValueError that names
    it, not a TypeError from deep inside."""
    cls = family(name)
    options = {**cls.knobs, **options}
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as e:
        raise ValueError(f"task {name}: {e} (options given: {options})") from None
    return cls(**options)


def family_key(text: str) -> str | None:
    """The split key of a normalised question from the family whose phrasing it is, or None when no family
    claims it. Families' phrasings are disjoint, so the first claim is the only one (tests/test_tasks.py pins
    the keys of every family's questions)."""
    for cls in TASKS.values():
        key = cls.content_key(text)
        if key is not None:
            return key
    return None
