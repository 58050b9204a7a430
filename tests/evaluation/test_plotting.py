"""Every classification figure renders to a real, non-constant PNG; bad inputs
raise; the shared figure helpers."""

from __future__ import annotations

import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from ekfac_laplace.evaluation.plotting import (
    axes_or_new,
    confidence_histogram,
    confidence_map,
    legend_outside,
    line_style,
    new_figure,
    ood_histogram,
    positive_int,
    reliability_diagram,
    save_figure,
    shift_curves,
)
from tests.evaluation.images import assert_real_image

F64 = torch.float64


@pytest.fixture
def classification() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    probs = (2 * torch.randn(200, 3, generator=generator, dtype=F64)).softmax(dim=1)
    targets = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return probs, targets


def _toy_classifier(x: Tensor) -> Tensor:
    logits = torch.stack([x[:, 0], x[:, 1], -x[:, 0] - x[:, 1]], dim=1)
    return (2 * logits).softmax(dim=1)


def _draw_all(axes: list[Axes], classification) -> None:
    probs, targets = classification
    reliability_diagram(probs, targets, ax=axes[0], title="width")
    reliability_diagram(probs, targets, binning="mass", n_bins=10, ax=axes[1])
    confidence_histogram(probs, targets, ax=axes[2], title="confidence")
    results = {"MAP": {0.0: 0.1, 2.0: 0.3, 1.0: 0.2}, "EKFAC": {0.0: 0.05, 2.0: 0.1}}
    shift_curves(results, metric="ECE", shift="rotation", ax=axes[3])
    X = torch.randn(30, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    y = _toy_classifier(X).argmax(dim=1)
    confidence_map(_toy_classifier, X, y, ax=axes[4], resolution=30, title="map")
    scores_in, scores_out = torch.rand(100) * 0.5, torch.rand(80) * 0.8 + 0.3
    ood_histogram(scores_in, scores_out, ax=axes[5], title="OOD")


def test_all_functions_share_one_figure(tmp_path, classification):
    fig, axes = new_figure(6)
    _draw_all(axes, classification)
    assert_real_image(fig, tmp_path / "all.png")


def test_each_function_draws_a_real_image(tmp_path, classification):
    probs, targets = classification
    draws = {
        "reliability": lambda ax: reliability_diagram(probs, targets, ax=ax),
        "confidence": lambda ax: confidence_histogram(probs, targets, ax=ax),
        "shift": lambda ax: shift_curves(
            {"MAP": {0.0: 0.1, 1.0: 0.2}}, metric="NLL", shift="noise", ax=ax
        ),
        "map": lambda ax: confidence_map(
            _toy_classifier,
            torch.randn(10, 2),
            torch.arange(10) % 3,
            ax=ax,
            resolution=20,
        ),
        "ood": lambda ax: ood_histogram(torch.rand(20), torch.rand(20) + 0.5, ax=ax),
    }
    for name, draw in draws.items():
        fig, (ax,) = new_figure()
        assert draw(ax) is ax
        assert_real_image(fig, tmp_path / name / f"{name}.png")


def test_ax_none_creates_a_figure(tmp_path, classification):
    probs, targets = classification
    axes = [
        reliability_diagram(probs, targets),
        confidence_histogram(probs, targets),
        shift_curves({"MAP": {0.0: 1.0, 1.0: 2.0}}, metric="NLL", shift="noise"),
        confidence_map(
            _toy_classifier, torch.randn(8, 2), torch.arange(8) % 3, resolution=10
        ),
        ood_histogram(torch.rand(10), torch.rand(10)),
    ]
    for index, ax in enumerate(axes):
        assert isinstance(ax, Axes) and isinstance(ax.get_figure(), Figure)
        assert_real_image(ax.get_figure(), tmp_path / f"own_{index}.png")


def test_new_figure_and_save_figure(tmp_path):
    fig, axes = new_figure(4, ncols=3)
    assert len(axes) == 4 and len(fig.axes) == 4
    assert tuple(fig.get_size_inches()) == pytest.approx((12.0, 6.4))
    for ax in axes:
        ax.plot([0, 1], [1, 0])
    # no suffix: .png is added; parents are created
    assert save_figure(fig, tmp_path / "a" / "b" / "grid") == tmp_path / "a/b/grid.png"
    assert (tmp_path / "a/b/grid.png").exists()
    with pytest.raises(ValueError, match="n_axes must be a positive integer, got 0"):
        new_figure(0)
    with pytest.raises(ValueError, match="ncols must be a positive integer"):
        new_figure(2, ncols=0)


def test_axes_or_new_and_positive_int():
    fig, (ax,) = new_figure()
    assert axes_or_new(ax) is ax
    assert isinstance(axes_or_new(None).get_figure(), Figure)
    assert positive_int("n_examples", 3) == 3
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="n_examples must be a positive integer"):
            positive_int("n_examples", bad)


def test_bad_inputs_raise(classification):
    probs, targets = classification
    with pytest.raises(ValueError, match=r"targets must have shape \(N,\) = \(200,\)"):
        reliability_diagram(probs, targets[:-1])
    with pytest.raises(ValueError, match=r"Unknown binning"):
        reliability_diagram(probs, targets, binning="log")
    with pytest.raises(ValueError, match=r"targets must have shape \(N,\)"):
        confidence_histogram(probs, targets[:10])
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        confidence_histogram(probs, targets, n_bins=0)
    with pytest.raises(ValueError, match="results is empty"):
        shift_curves({}, metric="NLL", shift="noise")
    with pytest.raises(ValueError, match="curve of 'MAP' is empty"):
        shift_curves({"MAP": {}}, metric="NLL", shift="noise")
    with pytest.raises(
        ValueError, match=r"X must have shape \(N, 2\), got shape \(4, 3\)"
    ):
        confidence_map(_toy_classifier, torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"y must have shape \(N,\) = \(4,\)"):
        confidence_map(_toy_classifier, torch.zeros(4, 2), torch.zeros(5))
    with pytest.raises(ValueError, match="resolution must be at least 2"):
        confidence_map(_toy_classifier, torch.zeros(4, 2), torch.zeros(4), resolution=1)
    with pytest.raises(ValueError, match="margin must be non-negative"):
        confidence_map(_toy_classifier, torch.zeros(4, 2), torch.zeros(4), margin=-1)
    with pytest.raises(ValueError, match=r"predict_proba\(grid\).*softmax"):
        confidence_map(lambda x: x * 5, torch.randn(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="returned 1 rows for 100 grid points"):
        confidence_map(
            lambda x: torch.full((1, 2), 0.5),
            torch.randn(4, 2),
            torch.zeros(4),
            resolution=10,
        )
    with pytest.raises(ValueError, match=r"scores_out must have shape \(N,\)"):
        ood_histogram(torch.rand(5), torch.rand(5, 2))


def test_reliability_gap_mixes_no_colour_into_the_bars(classification):
    ax = reliability_diagram(*classification)
    handles, labels = ax.get_legend_handles_labels()
    gap = handles[labels.index("gap to mean confidence")]
    # The gap is hatching without a fill: over a bar it adds no blended colour.
    assert all(not patch.get_fill() for patch in gap.patches)
    assert gap.patches[0].get_hatch()
    accuracy = handles[labels.index("accuracy")]
    assert all(patch.get_alpha() in (None, 1.0) for patch in accuracy.patches)


def test_shift_curves_label_units_and_tell_coinciding_curves_apart():
    curves = {name: {0.0: 1.0, 15.0: 2.0} for name in ("map", "kron", "ekfac")}
    ax = shift_curves(curves, metric="nll", shift="rotation", title="rotated")
    assert ax.get_ylabel() == "NLL" and ax.get_title() == "rotated"
    assert ax.get_xlabel() == "rotation angle (degrees)"
    assert shift_curves(curves, metric="ece", shift="blur").get_ylabel() == "ECE"
    styles = [(line.get_linestyle(), line.get_marker()) for line in ax.get_lines()]
    assert len(set(styles)) == 3  # same data, three distinguishable lines
    for first, second in zip(range(20), range(1, 21)):
        a, b = line_style(first), line_style(second)
        assert a["linestyle"] != b["linestyle"] and a["marker"] != b["marker"]
    fig, axes = new_figure(2)
    shift_curves(curves, metric="nll", shift="noise", ax=axes[0], legend=False)
    assert axes[0].get_legend() is None
    legend_outside(fig, axes[0])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(curves)


def test_ood_histogram_names_its_sets():
    ax = ood_histogram(
        torch.rand(20), torch.rand(20), in_label="digits", out_label="photos (OOD)"
    )
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "digits",
        "photos (OOD)",
    ]
