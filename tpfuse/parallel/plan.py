"""Deprecated module: the sharding description is :mod:`tpfuse.parallel.layout` (``TPPlan`` is ``TPLayout``, ...).
Importing a former name from here still works, with a DeprecationWarning."""


def __getattr__(name):
    from .layout import renamed_attr

    return renamed_attr(__name__, name)
