"""The registry of block structures: what is registered, and a new structure."""

from __future__ import annotations

import io
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn

from ekfac_laplace import EKFACLaplace, EKFACOptions
from ekfac_laplace.blocks import (
    BlockStructure,
    claiming_structure,
    registered_structures,
    structure_named,
)
from ekfac_laplace.layout import ParameterLayout
from tests.cases import loader
from tests.utils import (
    assert_close,
    blocks,
    corrected_eigenvalues,
    dense_ggn,
    jacobians,
)


def test_the_three_structures_are_registered_by_priority():
    names = [structure.name for structure in registered_structures()]
    assert names == ["exact", "kronecker", "diagonal"]
    small, large = torch.zeros(3), torch.zeros(30)
    options = EKFACOptions(dense_blocks_up_to=10)
    assert claiming_structure(small, options) is structure_named("exact")
    assert claiming_structure(large, options) is None  # the layer's own structure
    with pytest.raises(ValueError, match="No block structure is named 'lowrank'"):
        structure_named("lowrank")
    with pytest.raises(ValueError, match="'exact' is registered"):
        type("Again", (BlockStructure,), {"name": "exact"})


@pytest.fixture
def exact_diagonal():
    """A new structure, declared in one class (as a new module of blocks/ would):
    the exact diagonal ``Σ j²`` of the tensors it is pointed at, a Linear layer's
    weight among them (laplace-torch's ``"diag"``, per tensor)."""

    class ExactDiagonal(BlockStructure):
        name = "test_exact_diagonal"
        priority = 100
        targets: tuple[Tensor, ...] = ()

        def claims(self, param: Tensor, options: EKFACOptions) -> bool:
            return any(param is target for target in self.targets)

        def shapes(self, param: Tensor):
            return tuple(param.shape), []

        def start(self, param: Tensor, dtype: torch.dtype) -> Tensor:
            return torch.zeros(param.numel(), dtype=dtype, device=param.device)

        def accumulate(self, total: Tensor, rows: Tensor) -> None:
            total += rows.square().sum(0)

        def decompose(self, total: Tensor, param: Tensor, description: str):
            return (), total.reshape(param.shape)

        def merged(
            self,
            basis: Sequence[Tensor],
            values: Tensor,
            total: Tensor,
            param: Tensor,
            description: str,
        ):
            return (), values + total.reshape(values.shape)

    structure = structure_named("test_exact_diagonal")
    yield structure
    if structure in registered_structures():
        structure.unregister()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def test_a_new_structure_is_one_class_and_fits_exactly(exact_diagonal):
    model = _model()
    # A hidden layer's weight (rows from its inputs and output gradients) and an
    # output layer's (rows in closed form from the loss curvature).
    exact_diagonal.targets = (model[0].weight, model[2].weight)
    X, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    layout = ParameterLayout(model, list(model.parameters()))
    assert [layout.structure(i) for i in range(4)] == [
        "test_exact_diagonal",
        "kronecker",
        "test_exact_diagonal",
        "kronecker",
    ]
    la = EKFACLaplace(model, "classification")
    la.fit(loader(X, y, batch_size=5))
    assert [block.structure for block in la.fitted_layout.blocks] == [
        "test_exact_diagonal",
        "kronecker",
        "test_exact_diagonal",
        "kronecker",
    ]
    params = list(model.parameters())
    exact = blocks(
        dense_ggn(model, params, X, "classification"), [p.numel() for p in params]
    )
    for index, (block, basis, values) in enumerate(
        zip(exact, la.H.eigenvectors, la.H.eigenvalues)
    ):
        if index in (0, 2):  # the new structure: the exact diagonal
            assert basis == () and values.shape == params[index].shape
            assert_close(values.flatten(), torch.diagonal(block))
        else:  # the biases keep EKFAC, in their layer's basis
            assert_close(values.flatten(), corrected_eigenvalues(block, basis))
    # The GLM predictive through the structure equals the dense Jacobians'.
    J, f = jacobians(model, params, X[:4])
    covariance = torch.linalg.inv(la.posterior_precision.to_matrix())
    mean, variance = la._glm_predictive_distribution(X[:4])
    assert_close(mean, f)
    assert_close(variance, J @ covariance @ J.transpose(1, 2))
    # Saved with its name, loaded back.
    buffer = io.BytesIO()
    torch.save(la.state_dict(), buffer)
    buffer.seek(0)
    restored = EKFACLaplace(model, "classification")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.fitted_layout == la.fitted_layout
    assert_close(restored._glm_predictive_distribution(X[:4])[1], variance)
    # Online: the same data again doubles it (its own merge).
    la.fit(loader(X, y, batch_size=5), override=False)
    assert_close(la.H.eigenvalues[0].flatten(), 2 * torch.diagonal(exact[0]))


def test_a_state_naming_a_structure_this_installation_lacks_is_refused(
    exact_diagonal,
):
    model = _model()
    exact_diagonal.targets = (model[0].weight,)
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    la = EKFACLaplace(model, "classification")
    la.fit(loader(X, y))
    state = la.state_dict()
    exact_diagonal.unregister()
    fresh = EKFACLaplace(model, "classification")
    with pytest.raises(ValueError, match="No block structure is named"):
        fresh.load_state_dict(state)
    assert fresh.H is None
