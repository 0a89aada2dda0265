"""Only the optional C extensions; everything else is in pyproject.toml.

`cdc._speedups` is the CDC path's per-change loops in C (XLogData framing, the tuple loop,
row changes, typed rows); `gateway._speedups` writes and keeps a change's history entry and
hands events to the hubs; `walcast._speedups` routes the common INSERT, UPDATE and DELETE and
loops over a run of them. Optional: without a compiler the build goes on, and walcast uses
their Python twins instead (same results; see each .c file).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("cdc._speedups", ["cdc/_speedups.c"], optional=True),
        Extension("gateway._speedups", ["gateway/_speedups.c"], optional=True),
        Extension("walcast._speedups", ["walcast/_speedups.c"], optional=True),
    ]
)
