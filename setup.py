"""Only the optional C extension; everything else is in pyproject.toml.

`cdc._speedups` is the CDC path's per-change loops in C (XLogData framing, the tuple loop,
Inserts, typed rows). Optional: without a compiler the build goes on, and `cdc` uses their
Python twins instead (same results; see cdc/_speedups.c).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("cdc._speedups", ["cdc/_speedups.c"], optional=True)])
