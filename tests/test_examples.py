"""Every example script runs (at small sizes)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

SMALL_ARGUMENTS = {
    "example_quickstart.py": ["--n-train", "200", "--hidden", "16", "--epochs", "2"],
}


def test_every_example_has_small_arguments():
    scripts = sorted(p.name for p in EXAMPLES.glob("example_*.py"))
    assert scripts and set(scripts) == set(SMALL_ARGUMENTS)


@pytest.mark.parametrize("script", sorted(SMALL_ARGUMENTS))
def test_example_runs(script: str, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, *SMALL_ARGUMENTS[script]])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    out = capsys.readouterr().out
    assert "all ekfac" in out and "acc" in out
