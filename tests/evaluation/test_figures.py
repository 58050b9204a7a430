"""The figures of a comparison and of a sampling run, as real PNG files."""

from __future__ import annotations

import matplotlib.image
import torch

from ekfac_laplace.evaluation.figures import write_comparison_plots, write_sample_plot
from ekfac_laplace.evaluation.metrics import (
    ClassificationPredictions,
    RegressionPredictions,
)
from ekfac_laplace.evaluation.problems import load_problem
from ekfac_laplace.evaluation.report import Comparison, ComparisonRow
from ekfac_laplace.evaluation.sampling import SampleCheck


def _predictions(seed: int) -> ClassificationPredictions:
    generator = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(40, 10, generator=generator), -1)
    return ClassificationPredictions(
        probs, torch.randint(0, 10, (40,), generator=generator)
    )


def _assert_images(paths) -> None:
    for path in paths:
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 50 and image.shape[1] > 50 and image.std() > 0


def test_comparison_figures_of_a_classification_problem(tmp_path):
    problem = load_problem("digits")
    rows, predictions = [], {}
    for seed, name in enumerate(("map", "all_ekfac")):
        shift = {
            kind: {s: {"nll": 1.0 + s / 100, "ece": 0.1} for s in strengths}
            for kind, strengths in problem.shift_loaders.items()
        }
        rows.append(
            ComparisonRow(
                name, None, None, None, test={"nll": 0.5, "ece": 0.05}, shift=shift
            )
        )
        predictions[name] = {"test": _predictions(seed), "ood": _predictions(seed + 9)}
    rows.append(ComparisonRow("all_full", "all", "full", "ggn", status="failed"))
    comparison = Comparison(rows, predictions, {"likelihood": "classification"})
    written = write_comparison_plots(comparison, problem, tmp_path)
    assert [path.name for path in written] == [
        "reliability.png",
        "confidence.png",
        "ood_entropy.png",
        "shift_rotation.png",
        "shift_noise.png",
    ]
    _assert_images(written)
    nothing = Comparison([rows[-1]], {}, {})
    assert write_comparison_plots(nothing, problem, tmp_path / "none") == []


def test_sample_figure(tmp_path):
    variance = torch.rand(30) + 0.1
    check = SampleCheck(50, variance, variance * 1.1, 0.1, 0.14, 0.05)
    predictions = {name: _predictions(seed) for seed, name in enumerate(("map", "glm"))}
    _assert_images([write_sample_plot(predictions, check, tmp_path / "c.png")])
    mean = torch.zeros(20, 1)
    regression = {
        name: RegressionPredictions(mean, torch.rand(20, 1) + 0.1, mean)
        for name in ("map", "glm")
    }
    _assert_images([write_sample_plot(regression, check, tmp_path / "r.png")])
