"""The prior trade-off plots: curves, marks and references, checked for content."""

from __future__ import annotations

import pytest

from ekfac_laplace.evaluation.plotting import new_figure
from ekfac_laplace.evaluation.prior_plots import (
    prior_curves,
    reference_style,
    tradeoff_curves,
)
from tests.evaluation.images import assert_real_image

CURVES = {
    "ll_ekfac": [(2.0, 2.1), (0.5, 1.5), (0.1, 2.5)],
    "all_ekfac": [(1.8, 2.0), (0.4, 1.4), (0.09, 2.4)],
}


def _legend_texts(ax) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_tradeoff_curves_draw_curves_marks_and_references(tmp_path):
    fig, (ax,) = new_figure(1)
    tradeoff_curves(
        CURVES,
        x_metric="test_nll",
        y_metric="shift_nll",
        marks={
            "ll_ekfac": {"validation": (0.1, 2.5), "marglik": (0.5, 1.5)},
            "all_ekfac": {"validation": (0.09, 2.4)},
        },
        references={"map": (0.08, 3.1), "map_ts": (0.08, 2.7), "ensemble5": (0.07, 3)},
        ax=ax,
        title="trade-off",
    )
    assert ax.get_xlabel() == "test NLL (log scale)"
    assert ax.get_ylabel() == "NLL under shift (mean over shifts)"
    assert ax.get_xscale() == "log" and ax.get_title() == "trade-off"
    assert _legend_texts(ax) == [
        "ll_ekfac",
        "all_ekfac",
        "prior by validation",
        "prior by marglik",
        "map",
        "map_ts",
        "ensemble5",
    ]
    lines = ax.get_lines()
    curve = next(line for line in lines if line.get_label() == "ll_ekfac")
    assert list(curve.get_xdata()) == [2.0, 0.5, 0.1]
    marks = [line for line in lines if line.get_marker() == "D"]
    assert [tuple(m.get_xydata()[0]) for m in marks] == [(0.1, 2.5), (0.09, 2.4)]
    assert marks[0].get_color() == curve.get_color()
    star = next(line for line in lines if line.get_marker() == "*")
    assert tuple(star.get_xydata()[0]) == (0.5, 1.5)
    refs = {line.get_label(): line for line in lines if line.get_label() == "map"}
    assert refs["map"].get_marker() == "X" and refs["map"].get_color() == "black"
    assert [t.get_text() for t in ax.texts] == ["δ small", "δ small"]
    assert_real_image(fig, tmp_path / "tradeoff.png")


def test_prior_curves_against_the_prior_on_a_log_axis(tmp_path):
    fig, axes = new_figure(2)
    prior_curves(
        {"all_ekfac": [(0.1, 0.9), (1.0, 0.4), (10.0, 0.2)]},
        metric="test_nll",
        marks={"all_ekfac": {"marglik": (1.0, 0.4)}},
        references={"map": 0.25},
        ax=axes[0],
    )
    assert axes[0].get_xscale() == "log"
    assert axes[0].get_xlabel() == "prior precision δ"
    assert axes[0].get_ylabel() == "test NLL"
    assert _legend_texts(axes[0]) == ["all_ekfac", "prior by marglik", "map"]
    reference = next(line for line in axes[0].get_lines() if line.get_label() == "map")
    assert list(reference.get_ydata()) == [0.25, 0.25]
    prior_curves(
        {"x": [(1.0, -10.0), (10.0, -1e5)]},
        metric="log_marginal_likelihood",
        ax=axes[1],
        legend=False,
    )
    assert axes[1].get_yscale() == "symlog" and axes[1].get_legend() is None
    assert_real_image(fig, tmp_path / "sweep.png")


def test_reference_styles_and_errors():
    assert reference_style("map") == ("X", "black")
    assert reference_style("map_ts")[0] == "P"
    assert reference_style("ensemble10")[0] == "h"
    assert reference_style("mc_dropout:0.2")[0] == "p"
    assert reference_style("mapper") == ("o", "gray")
    with pytest.raises(ValueError, match="curves is empty"):
        tradeoff_curves({}, x_metric="test_nll", y_metric="shift_nll")
    with pytest.raises(ValueError, match="curve of 'a' is empty"):
        prior_curves({"a": []}, metric="test_nll")
