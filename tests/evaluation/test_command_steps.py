"""What both commands share: the MAP network's checkpoint, the progress bar."""

from __future__ import annotations

import io
import json
import sys
from argparse import Namespace

import pytest

from ekfac_laplace.evaluation.cli import main
from ekfac_laplace.evaluation.command_steps import show_progress
from tests.evaluation.commands import QUICK, Terminal


def test_checkpoint_round_trip_gives_the_same_results(tmp_path):
    common = ["compare", "--dataset", "moons", "--quiet", "--no-plots"]
    common += ["--candidates", "all_ekfac"]
    checkpoint = tmp_path / "map.pt"
    assert (
        main(
            [*common, "--epochs", "3", "--save-checkpoint", str(checkpoint)]
            + ["--out", str(tmp_path / "a")]
        )
        == 0
    )
    assert (
        main([*common, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b")])
        == 0
    )
    first, second = (
        json.loads((tmp_path / name / "results.json").read_text())["records"][0]
        for name in ("a", "b")
    )
    # Same weights; the float32 sums over a reshuffled loader differ in rounding.
    assert first["log_marginal_likelihood"] == pytest.approx(
        second["log_marginal_likelihood"], rel=1e-4
    )
    assert first["test_nll"] == pytest.approx(second["test_nll"], rel=1e-4)


def test_wrong_checkpoint_is_a_usage_error(tmp_path, capsys):
    checkpoint = tmp_path / "moons.pt"
    main(
        [
            "compare",
            "--dataset",
            "moons",
            *QUICK,
            "--no-plots",
            "--candidates",
            "map",
            "--save-checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path / "x"),
        ]
    )
    capsys.readouterr()
    status = main(["compare", "--checkpoint", str(checkpoint), "--out", str(tmp_path)])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert "cannot load --checkpoint" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("stdout_tty", "stderr_tty", "quiet", "shown"),
    [
        (True, True, False, True),
        (True, False, False, False),
        (False, True, False, False),
        (True, True, True, False),
    ],
)
def test_progress_bar_only_on_terminals(
    stdout_tty, stderr_tty, quiet, shown, monkeypatch
):
    monkeypatch.setattr(sys, "stdout", Terminal() if stdout_tty else io.StringIO())
    monkeypatch.setattr(sys, "stderr", Terminal() if stderr_tty else io.StringIO())
    assert show_progress(Namespace(quiet=quiet)) is shown
