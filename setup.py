"""Only the optional C extension; everything else is in pyproject.toml.

`cdc._speedups` is the decoder's tuple loop in C. Optional: without a compiler the build goes
on, and `cdc.decoder` uses its Python loop instead (same results; see cdc/_speedups.c).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("cdc._speedups", ["cdc/_speedups.c"], optional=True)])
