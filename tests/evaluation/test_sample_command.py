"""The ``ekfac-laplace sample`` command at small sizes."""

from __future__ import annotations

import json
import math

import pytest

from ekfac_laplace.evaluation.cli import main
from tests.evaluation.commands import QUICK
from tests.evaluation.images import image_ok


def test_sample_writes_summary_and_plot(tmp_path, capsys):
    out = tmp_path / "samples"
    status = main(
        [
            "sample",
            "--dataset",
            "moons",
            *QUICK,
            "--n-samples",
            "400",
            "--save-samples",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    summary = json.loads((out / "samples.json").read_text())
    assert set(summary["test_metrics"]) == {"map", "glm", "samples"}
    # 400 samples: the relative error of a variance estimate is ~sqrt(2/399) = 0.07.
    assert summary["sample_variance_relative_error_median"] < 0.15
    assert 0.04 < summary["sample_variance_relative_error_expected_median"] < 0.05
    assert summary["sample_mean_error_in_std"] < 0.2
    assert image_ok(out / "samples.png")
    import torch

    samples = torch.load(out / "samples.pt")
    assert samples.shape == (400, summary["n_params"])
    assert summary["sample_mean_error_in_std_expected"] == pytest.approx(
        (2 / (math.pi * 400)) ** 0.5
    )
    printed = capsys.readouterr().out
    # What it demonstrates first: samples agree with the analytic posterior; then
    # the GLM predictive; then the sampled networks, with why they are worse.
    agreement = printed.index("agree with the analytic posterior")
    glm = printed.index("GLM     accuracy")
    sampled = printed.index("sampled accuracy")
    assert agreement < glm < sampled
    assert "samples accuracy" not in printed
