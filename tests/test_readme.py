"""README.rst renders without a docutils warning (PyPI shows it)."""

from __future__ import annotations

from pathlib import Path

import docutils.core

README = Path(__file__).resolve().parent.parent / "README.rst"


def test_readme_renders_cleanly() -> None:
    docutils.core.publish_string(
        README.read_text(encoding="utf-8"),
        writer="null",
        settings_overrides={"report_level": 2, "halt_level": 2},
    )
