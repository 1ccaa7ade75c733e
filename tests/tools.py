"""Test helpers about the machine: what is installed, what CI demands."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def missing(what: str) -> NoReturn:
    """
    Skip the test for want of C{what}; under C{CI=true} fail it instead,
    so that CI can never pass by skipping what it should have run.
    """
    if IN_CI:
        pytest.fail(f"CI=true and {what}", pytrace=False)
    pytest.skip(what)


def require_tool(name: str) -> str:
    """The path of command C{name}, or skip (fail in CI) without it."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed")
    return path
