"""The engine's accumulators: factors, cache, corrections, diagonal squares, eigh."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ekfac_laplace import accumulators
from ekfac_laplace.accumulators import (
    CorrectionAccumulator,
    DiagonalSquares,
    FactorAccumulator,
    PerExampleGradients,
    contraction_order,
    per_example_numbers,
)
from ekfac_laplace.diagonal import ModuleCall
from ekfac_laplace.kinds.linear import Linear
from ekfac_laplace.layer import KroneckerLayer, LayerBasis
from ekfac_laplace.layout import DiagonalModule
from ekfac_laplace.options import EKFACOptions, KFACApprox
from ekfac_laplace.output_curvature import OutputCurvature
from tests.utils import assert_close

LINEAR = Linear()

F64 = torch.float64
B, S, D_IN, D_OUT, K = 5, 3, 4, 2, 3


def _layer(weight: bool = True, bias: bool = True) -> KroneckerLayer:
    return KroneckerLayer(
        "layer",
        nn.Linear(D_IN, D_OUT),
        LINEAR,
        weight_index=0 if weight else None,
        bias_index=1 if bias else None,
    )


def _data(positions: int = S):
    torch.manual_seed(0)
    a = torch.randn(B, positions, D_IN, dtype=F64)
    g = torch.randn(K, B, positions, D_OUT, dtype=F64)
    return a, g


def _feed(accumulator, layer, a, g) -> None:
    accumulator.begin(layer, a)
    for g_k in g:
        accumulator.gradient(layer, a, g_k)
    accumulator.end(layer, a)
    accumulator.batch_done(a.shape[0])


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=generator))[0]


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_factor_accumulator_sums_the_kronecker_factors(kfac_approx):
    a, g = _data()
    layer = _layer()
    factors = FactorAccumulator([layer], KFACApprox(kfac_approx), 0, num_data=B)
    _feed(factors, layer, a, g)
    if kfac_approx == "expand":
        A = torch.einsum("bsi,bsj->ij", a, a)
        G = torch.einsum("kbsi,kbsj->ij", g, g)
    else:
        A = a.mean(1).T @ a.mean(1)
        G = torch.einsum("kbi,kbj->ij", g.sum(2), g.sum(2))
    assert_close(factors.input_factors["layer"], A)
    assert_close(factors.gradient_factors["layer"], G)
    q_g, q_a, _ = factors.eigenbases()["layer"]
    for q, M in ((q_g, G), (q_a, A)):
        rotated = q.T @ M @ q
        assert_close(rotated - torch.diag(torch.diagonal(rotated)), torch.zeros_like(M))
    # Without the weight in the posterior there is no input factor.
    bias_only = _layer(weight=False)
    factors = FactorAccumulator([bias_only], KFACApprox.EXPAND, 0, num_data=B)
    _feed(factors, bias_only, a, g)
    assert "layer" not in factors.input_factors
    assert factors.eigenbases()["layer"].input is None


@pytest.mark.parametrize("columns", [1, 5, 128, 129, 300])
def test_upper_gram_and_its_mirror_equal_the_gram_matrix(columns):
    """The recursive halving computes the upper triangle; the mirror the rest."""
    x = torch.randn(37, columns, dtype=F64, generator=torch.Generator().manual_seed(3))
    start = torch.randn(columns, columns, dtype=F64)
    start = start + start.T
    out = start.clone()
    accumulators.add_upper_gram(out, x)
    expected = start + x.T @ x
    assert_close(out.triu(), expected.triu())
    mirrored = accumulators.mirror_upper(out)
    assert mirrored is out and torch.equal(out, out.T)
    assert_close(out, expected)


def test_factors_summed_by_halving_are_whole_wherever_they_are_read(monkeypatch):
    """Every reader (the factors, the eigenbases, the sums over ranks) sees G, A."""
    monkeypatch.setattr(accumulators, "GRAM_LEAF_COLUMNS", 1)  # halve down to 1
    a, g = _data()
    layer = _layer()
    expected = {
        "input": torch.einsum("bsi,bsj->ij", a, a),
        "gradient": torch.einsum("kbsi,kbsj->ij", g, g),
    }
    factors = FactorAccumulator([layer], KFACApprox.EXPAND, 0, num_data=B)
    for _ in range(2):  # a running sum over two batches
        _feed(factors, layer, a, g)
    A, G = factors.partial_sums()
    assert_close(A, 2 * expected["input"])
    assert_close(G, 2 * expected["gradient"])
    assert_close(factors.input_factors["layer"], 2 * expected["input"])
    assert_close(factors.gradient_factors["layer"], 2 * expected["gradient"])
    q_g, q_a, _ = factors.eigenbases()["layer"]
    for q, M in ((q_g, G), (q_a, A)):
        rotated = q.T @ M @ q
        assert_close(rotated - torch.diag(torch.diagonal(rotated)), torch.zeros_like(M))


def test_factors_of_transposed_views_equal_those_of_contiguous_tensors():
    """A convolution's patches and gradients arrive as views of (B, d, S) tensors."""
    a, g = _data(positions=7)
    a_view = a.transpose(1, 2).contiguous().transpose(1, 2)
    g_view = g.transpose(2, 3).contiguous().transpose(2, 3)
    assert a_view.stride(-1) != 1 and g_view.stride(-1) != 1
    layer = _layer()
    results = []
    for inputs, gradients in ((a, g), (a_view, g_view)):
        factors = FactorAccumulator([layer], KFACApprox.EXPAND, 0, num_data=B)
        _feed(factors, layer, inputs, gradients)
        results.append(
            (factors.input_factors["layer"], factors.gradient_factors["layer"])
        )
    for contiguous, view in zip(*results):
        assert_close(view, contiguous)


def test_cache_is_projected_from_the_first_batch_and_dropped_over_budget():
    a, g = _data()
    layer = _layer()
    per_batch = (a.numel() + g.numel()) * 8
    fits = FactorAccumulator([layer], KFACApprox.EXPAND, 3 * per_batch, num_data=2 * B)
    fits.plan({"layer": a}, [layer], K)
    assert fits.caching
    _feed(fits, layer, a, g)
    assert fits.cache_bytes == per_batch and len(fits.cache["layer"]) == 1
    cached_a, cached_g = fits.cache["layer"][0]
    assert torch.equal(cached_a, a) and torch.equal(cached_g, g.transpose(0, 1))
    # Projected over budget from the first batch: never starts caching.
    too_small = FactorAccumulator([layer], KFACApprox.EXPAND, per_batch, num_data=2 * B)
    too_small.plan({"layer": a}, [layer], K)
    assert not too_small.caching
    # A projection that was too low: the cache is dropped once over budget.
    fits.plan({"layer": a}, [layer], K)  # only the first batch projects
    for _ in range(3):
        _feed(fits, layer, a, g)
    assert not fits.caching and fits.cache["layer"] == []


ORDERS = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("positions", [1, S])
def test_correction_accumulator_squares_rotated_per_example_gradients(
    positions, order, monkeypatch
):
    """Every contraction order (rotate the inputs, the gradients, before or after)."""
    monkeypatch.setattr(accumulators, "contraction_order", lambda *_: order)
    a, g = _data(positions)
    layer = _layer()
    q_g, q_a = _orthogonal(D_OUT, 1), _orthogonal(D_IN, 2)
    correction = CorrectionAccumulator({"layer": LayerBasis(q_g, q_a)})
    _feed(correction, layer, a, g)
    per_example = torch.einsum("kbso,kbsi->kboi", g, a.expand(K, -1, -1, -1))
    rotated = q_g.T @ per_example @ q_a
    assert_close(correction.weight_corrections["layer"], rotated.square().sum((0, 1)))
    bias = (g.sum(2) @ q_g).square().sum((0, 1))
    assert_close(correction.bias_corrections["layer"], bias)


def test_contraction_order_picks_the_fewest_multiply_adds():
    # Many positions, few features (a first convolution): rotate after the product.
    assert contraction_order(256, 1024, 27, 16, 9) == (False, False)
    # Few positions, many input features, many passes: rotate the inputs once.
    assert contraction_order(256, 256, 144, 32, 9) == (True, False)
    # One pass (Monte Carlo) over the same layer: rotate after the product.
    assert contraction_order(256, 256, 144, 32, 1) == (False, False)
    # Fewer positions than features: rotate both before the product.
    assert contraction_order(8, 16, 64, 64, 9) == (True, True)


def test_replay_and_the_output_layer_closed_form_equal_a_second_pass():
    torch.manual_seed(0)
    f = torch.randn(B, D_OUT, dtype=F64)
    curvature = OutputCurvature(
        f, torch.zeros(B, dtype=torch.long), "classification", EKFACOptions(), None
    )
    a = torch.randn(B, 1, D_IN, dtype=F64)
    layer = _layer()
    bases = {"layer": LayerBasis(_orthogonal(D_OUT, 3), _orthogonal(D_IN, 4))}
    # The output layer's closed form against its vectors fed as gradients.
    closed = CorrectionAccumulator(bases)
    closed.output(layer, a, curvature)
    explicit = CorrectionAccumulator(bases)
    vectors = curvature.vectors().transpose(0, 1).unsqueeze(2)  # (K, B, 1, C)
    _feed(explicit, layer, a, vectors)
    for name in ("weight_corrections", "bias_corrections"):
        assert_close(getattr(closed, name)["layer"], getattr(explicit, name)["layer"])
    # Replaying a cache (an output-layer entry and a hidden-layer entry).
    hidden_a, g = _data()
    replayed = CorrectionAccumulator(bases)
    cache = [(a, curvature), (hidden_a, g.transpose(0, 1))]
    replayed.replay(layer, cache)
    assert cache == []
    second_pass = CorrectionAccumulator(bases)
    second_pass.output(layer, a, curvature)
    _feed(second_pass, layer, hidden_a, g)
    assert_close(
        replayed.weight_corrections["layer"], second_pass.weight_corrections["layer"]
    )


@pytest.mark.parametrize(
    ("weight", "bias"), [(True, True), (True, False), (False, True)]
)
def test_compact_cache_of_many_positions_replays_as_a_second_pass(weight, bias):
    """Many positions (a convolution): the cache keeps per-example gradients only."""
    torch.manual_seed(0)
    positions = 40
    a = torch.randn(B, positions, D_IN, dtype=F64)
    g = torch.randn(K, B, positions, D_OUT, dtype=F64)
    layer = _layer(weight, bias)
    raw, compact = per_example_numbers(layer, positions, D_IN, K)
    assert compact < raw
    factors = FactorAccumulator([layer], KFACApprox.EXPAND, 2**30, num_data=2 * B)
    for _ in range(2):
        factors.plan({"layer": a}, [layer], K)
        _feed(factors, layer, a, g)
    entries = factors.cache["layer"]
    assert all(isinstance(entry, PerExampleGradients) for entry in entries)
    assert factors.cache_bytes == 2 * B * compact * 8
    bases = {"layer": LayerBasis(_orthogonal(D_OUT, 5), _orthogonal(D_IN, 6))}
    replayed = CorrectionAccumulator(bases)
    replayed.replay(layer, entries)
    second_pass = CorrectionAccumulator(bases)
    for _ in range(2):
        second_pass.plan({"layer": a}, [layer], K)
        _feed(second_pass, layer, a, g)
    for name in ("weight_corrections", "bias_corrections"):
        expected = getattr(second_pass, name)
        assert set(getattr(replayed, name)) == set(expected)
        for key, value in expected.items():
            assert_close(getattr(replayed, name)[key], value)


def test_diagonal_squares_sum_per_example_gradient_squares():
    torch.manual_seed(0)
    norm = nn.LayerNorm(4).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    entry = DiagonalModule("norm", norm, ["weight", "bias"], [0, 1])
    x = torch.randn(B, 3, 4, dtype=F64)
    g = torch.randn(B, 3, 4, dtype=F64)
    squares = DiagonalSquares([entry])
    squares.add(entry, ModuleCall.of("norm", norm, (x,), {}, norm(x)), (g,), B)
    params = {name: p.detach() for name, p in norm.named_parameters()}

    def inner(p, x_n, g_n):
        return (functional_call(norm, p, (x_n,)) * g_n).sum()

    per_example = vmap(grad(inner), in_dims=(None, 0, 0))(params, x, g)
    for name, total in zip(entry.param_names, squares.squares["norm"]):
        assert_close(total, per_example[name].square().sum(0))
