"""Helpers shared by the test modules, one module per topic.

Test modules import helpers from here (and fixtures come from the conftest files), never from
each other: `tests/test_test_layout.py` fails naming any file that imports a `test_*` module.
"""
