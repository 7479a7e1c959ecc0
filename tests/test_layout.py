"""The test tree must not shadow installed packages.

pytest (prepend import mode) puts the first folder above a test file that has no `__init__.py`
on sys.path. When `tests/kernels/` was importable as the top-level `kernels`, transformers found it
instead of the PyPI package `kernels` and every BERT/UNet parity test failed with an ImportError.
Every test folder is therefore a package under `tests`, and no installed top-level name may
resolve into this repository's test tree.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_every_test_folder_is_a_package_under_tests():
    missing = sorted(str(d.relative_to(TESTS.parent)) for d in [TESTS, *TESTS.rglob("*")]
                     if d.is_dir() and any(d.glob("*.py")) and not (d / "__init__.py").exists())
    assert not missing, f"test folders without __init__.py become top-level modules: {missing}"


def test_no_installed_top_level_name_resolves_into_tests():
    names = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    shadowed = []
    for name in sorted(names):
        if not name.isidentifier():
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        origins = [spec.origin] if spec and spec.origin else []
        origins += list(spec.submodule_search_locations or []) if spec else []
        if any(TESTS in Path(o).resolve().parents or Path(o).resolve() == TESTS for o in origins):
            shadowed.append(name)
    assert shadowed in ([], ["tests"]) and "tests" not in importlib.metadata.packages_distributions(), \
        f"installed packages shadowed by the test tree: {shadowed}"


def test_the_kernels_folder_is_not_the_top_level_kernels():
    spec = importlib.util.find_spec("kernels")
    assert spec is None or TESTS not in Path(spec.origin or "/").resolve().parents
