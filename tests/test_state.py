"""Saved posteriors: validated against the model before anything changes."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.utils.prune as prune
from laplace import Laplace
from torch import nn

from ekfac_laplace import EKFACLaplace, EKFACLLLaplace
from ekfac_laplace.state import checked_curvature
from tests.cases import loader


def _mlp(sizes=(4, 6, 4), bias: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(sizes[0], sizes[1], bias=bias),
        nn.Tanh(),
        nn.Linear(sizes[1], sizes[2], bias=bias),
    ).double()


def _fitted(model: nn.Module, subset: str = "all"):
    torch.manual_seed(0)
    X = torch.randn(12, model[0].in_features, dtype=torch.float64)
    y = torch.randint(0, model[2].out_features, (12,))
    la = Laplace(model, "classification", subset, "ekfac", prior_precision=0.5)
    la.fit(loader(X, y))
    return la, X


def _snapshot(la, X):
    state = la.state_dict()
    return {
        "H": [t.clone() for block in state["H"] for t in block],
        "mean": state["mean"].clone(),
        "prior": la.prior_precision.clone(),
        "predictive": la(X[:3]),
    }


def _unchanged(la, X, before):
    after = _snapshot(la, X)
    assert all(torch.equal(a, b) for a, b in zip(before["H"], after["H"]))
    for key in ("mean", "prior", "predictive"):
        assert torch.equal(before[key], after[key]), key


def _broken(state, edit):
    state = {**state, "H": [list(block) for block in state["H"]]}
    edit(state)
    state["H"] = [tuple(block) for block in state["H"]]
    return state


def _nan_eigenvalue(state):
    state["H"][0][0] = state["H"][0][0].clone().index_fill_(0, torch.tensor([0]), 0)
    state["H"][0][0][0, 0] = float("nan")


def _negative_eigenvalue(state):
    values = state["H"][1][0].clone()
    values[0] = -values.abs().max()
    state["H"][1][0] = values


def _not_orthonormal(state):
    state["H"][0][1] = state["H"][0][1] * 1.01


def _nan_eigenvector(state):
    q = state["H"][0][2].clone()
    q[0, 0] = float("inf")
    state["H"][0][2] = q


def _nan_mean(state):
    mean = state["mean"].clone()
    mean[3] = float("nan")
    state["mean"] = mean


def _short_mean(state):
    state["mean"] = state["mean"][:-1]


BROKEN = [
    (_nan_eigenvalue, "not finite"),
    (_negative_eigenvalue, "go down to"),
    (_not_orthonormal, "not orthonormal"),
    (_nan_eigenvector, "eigenvectors .* not finite"),
    (_nan_mean, "mean is not finite"),
    (_short_mean, "mean has shape"),
    (lambda s: s.update(prior_precision=torch.tensor(-1.0)), "finite and non-neg"),
    (lambda s: s.update(prior_precision=torch.ones(3)), "one value per parameter"),
    (lambda s: s.update(temperature=0.0), "temperature must be one finite, pos"),
    (lambda s: s.update(sigma_noise=torch.tensor(0.0)), "sigma_noise must be one"),
    (lambda s: s.update(prior_mean=torch.tensor(float("nan"))), "prior_mean must"),
    (lambda s: s.update(loss=torch.tensor(float("inf"))), "loss must be a finite"),
    (lambda s: s.update(n_data=0), "n_data must be a positive count"),
    (lambda s: s.update(enable_backprop="yes"), "enable_backprop must be True"),
    (lambda s: s.update(ekfac_options=(("engine", "slow"),)), "Unknown engine"),
]


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize(("edit", "match"), BROKEN, ids=[m for _, m in BROKEN])
def test_a_broken_state_is_refused_and_leaves_the_object_as_it_was(edit, match, subset):
    la, X = _fitted(_mlp(), subset)
    state = la.state_dict()
    other, _ = _fitted(_same_weights(la.model), subset)  # a second fit to load into
    before = _snapshot(other, X)
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(_broken(state, edit))
    _unchanged(other, X, before)
    fresh = Laplace(_same_weights(la.model), "classification", subset, "ekfac")
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(_broken(state, edit))
    assert fresh.H is None


def _same_weights(model: nn.Module) -> nn.Module:
    copy = _mlp()
    copy.load_state_dict(getattr(model, "model", model).state_dict())
    return copy


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_a_state_fitted_at_other_weights_is_refused(subset):
    """The mean would hold the old weights and the model the new ones."""
    la, X = _fitted(_mlp(), subset)
    state = la.state_dict()
    torch.manual_seed(1)
    other, _ = _fitted(_mlp(), subset)
    before = _snapshot(other, X)
    with pytest.raises(
        ValueError,
        match=r"The state's mean differs from the model's parameters \(largest "
        r"difference .*, at entry \d+ of the parameter vector\): the posterior "
        "was fitted at other weights than the model holds now",
    ):
        other.load_state_dict(state)
    _unchanged(other, X, before)
    same = Laplace(_same_weights(la.model), "classification", subset, "ekfac")
    same.load_state_dict(state)
    torch.testing.assert_close(same(X[:3]), la(X[:3]))


def test_a_mirrored_architecture_with_the_same_block_sizes_is_refused():
    """Linear(4,6)-Linear(6,4) and Linear(6,4)-Linear(4,6) without biases: both
    have blocks of 24 numbers; the shapes tell them apart."""
    la, X = _fitted(_mlp((4, 6, 4), bias=False))
    mirrored = EKFACLaplace(_mlp((6, 4, 6), bias=False), "classification")
    with pytest.raises(ValueError, match=r"another architecture"):
        mirrored.load_state_dict(la.state_dict())
    assert mirrored.H is None


def test_a_kronecker_block_for_a_layer_that_cannot_have_one_is_refused():
    la, X = _fitted(_mlp(bias=False))
    model = _mlp(bias=False)
    prune.identity(model[0], "weight")  # weight_orig: a diagonal block now
    pruned = EKFACLaplace(model, "classification")
    with pytest.raises(ValueError, match="cannot have one now"):
        pruned.load_state_dict(la.state_dict())
    assert pruned.H is None


def test_eigenvectors_of_a_transposed_shape_are_refused():
    la, _ = _fitted(_mlp((4, 4, 4)))  # square weights: only the shapes differ
    state = la.state_dict()
    block = state["H"][0]
    state["H"][0] = (block[0], block[2], block[1])  # Q_A and Q_G swapped: same size
    checked_curvature(state["H"], la.model, list(la.params))  # 4×4 both: passes
    rectangular, _ = _fitted(_mlp())
    state = rectangular.state_dict()
    values, q_g, q_a = state["H"][0]
    state["H"][0] = (values.T.contiguous(), q_a, q_g)
    with pytest.raises(ValueError, match=r"shape \(6, 4\) needs \(6, 4\)"):
        checked_curvature(state["H"], rectangular.model, list(rectangular.params))


def test_a_last_layer_state_ships_no_training_data_and_loads_by_name():
    la, X = _fitted(_mlp(), "last_layer")
    state = la.state_dict()
    assert state["data"] is None and state["_last_layer_name"] == "2"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert b"PK" in buffer.getvalue()[:4]
    buffer.seek(0)
    fresh = EKFACLLLaplace(la.model.model, "classification")  # last layer unknown
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh(X[:3]), la(X[:3]))
    # An older state that holds a first batch instead still loads.
    legacy = {**state, "_last_layer_name": None, "data": (X[:5], None)}
    older = EKFACLLLaplace(la.model.model, "classification")
    older.load_state_dict(legacy)
    assert torch.equal(older(X[:3]), la(X[:3]))
    # A state for another layer is refused.
    for name, match in (("0", "is for the last layer '0'"), ("1", "not an nn.Linear")):
        wrong = {**state, "_last_layer_name": name}
        target = la if name == "0" else EKFACLLLaplace(_mlp(), "classification")
        with pytest.raises(ValueError, match=match):
            target.load_state_dict(wrong)
