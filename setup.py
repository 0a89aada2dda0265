"""Only the optional C extensions; everything else is in pyproject.toml.

`cdc._speedups` is the CDC path's per-change loops in C (XLogData framing, the tuple loop,
row changes, typed rows); `walcast._speedups` routes the common INSERT and DELETE. Optional:
without a compiler the build goes on, and walcast uses their Python twins instead (same
results; see cdc/_speedups.c and walcast/_speedups.c).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("cdc._speedups", ["cdc/_speedups.c"], optional=True),
        Extension("walcast._speedups", ["walcast/_speedups.c"], optional=True),
    ]
)
