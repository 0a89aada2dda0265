"""walcast benchmarks: each module runs with one command and compares against a baseline
measured in the same run (see docs/benchmarks.md). Not part of the test suite."""
