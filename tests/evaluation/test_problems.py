"""Bundled problems by name: loaders and evaluation sets."""

from __future__ import annotations

import pytest

from ekfac_laplace.evaluation.comparison import EvaluationData
from ekfac_laplace.evaluation.problems import DATASETS, IMAGE_DATASETS, load_problem
from ekfac_laplace.evaluation.shifts import SHIFTS


@pytest.mark.parametrize("name", DATASETS)
def test_every_problem_loads_with_its_evaluation_sets(name):
    problem = load_problem(name, seed=0, batch_size=32)
    assert problem.name == name
    assert problem.likelihood in ("classification", "regression")
    for loader, split in (
        (problem.train_loader, problem.splits.train),
        (problem.val_loader, problem.splits.val),
        (problem.test_loader, problem.splits.test),
    ):
        assert loader.dataset is split and loader.batch_size == 32
    data = problem.evaluation_data()
    assert isinstance(data, EvaluationData) and data.test_loader is problem.test_loader
    if name in IMAGE_DATASETS:
        assert len(problem.ood_loader.dataset) == 500
        assert {k: sorted(v) for k, v in problem.shift_loaders.items()} == {
            k: sorted(v) for k, v in SHIFTS.items()
        }
    else:
        assert problem.ood_loader is None and problem.shift_loaders == {}


def test_unknown_problem():
    with pytest.raises(ValueError, match="Unknown data set 'mnist'"):
        load_problem("mnist")
