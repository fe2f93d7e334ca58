"""Mutation testing: deliberate bugs that the test suite must catch.

``catalogue.py`` lists small source patches (a named file, an exact old string, its replacement),
each a realistic bug in a kernel, backend, mask, cache or benchmark, with the tests that must fail
on it. ``runner.py`` applies each to a scratch copy of the tree, runs those tests there and
reports killed / survived. Run the whole catalogue with ``python -m tests.mutation`` (see
``--help``); CI runs the quick subset (``tests/mutation/test_catalogue.py``). Every new kernel or
mechanism adds its mutants here together with its tests.
"""
