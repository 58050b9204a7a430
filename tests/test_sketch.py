"""The sketches of a block's rotated curvature against dense float64 references."""

from __future__ import annotations

import pytest
import torch

from ekfac_laplace import lowrank
from ekfac_laplace.sketch import (
    CurvatureSketch,
    block_seed,
    corrected_block,
    corrected_matrix,
    merged_eigenpairs,
    sketch_columns,
    transposed_columns,
)
from tests.utils import assert_close

CPU = torch.device("cpu")


def _rows(m: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(m, *shape, generator=generator, dtype=torch.float64)


def _dense(rows: torch.Tensor) -> torch.Tensor:
    flat = rows.reshape(len(rows), -1)
    return flat.mT @ flat


def _Y(sketch: CurvatureSketch) -> torch.Tensor:
    if sketch.exact:
        return sketch.values
    return sketch.values.reshape(len(sketch.values), -1).mT


@pytest.mark.parametrize("shape", [(9,), (5, 7), (2, 3, 4), (3, 2)])
def test_rows_add_up_to_r_times_omega(shape):
    sketch = CurvatureSketch.new(shape, 2, 1, torch.float64, CPU)
    rows = _rows(30, shape)
    sketch.add_rows(rows[:12])
    sketch.add_rows(rows[12:])
    R = _dense(rows)
    assert sketch.exact == (R.shape[0] <= sketch_columns(2))
    expected = R if sketch.exact else R @ sketch.omega()
    assert_close(_Y(sketch), expected)
    if not sketch.exact:  # the Khatri-Rao columns: a Kronecker product each
        first = sketch.factors[0][0]
        for factor in sketch.factors[1:]:
            first = torch.kron(first, factor[0])
        assert_close(sketch.omega()[:, 0], first)


@pytest.mark.parametrize("shape", [(5, 7), (2, 2)])
def test_rank_one_rows_equal_their_outer_products(shape):
    g, a = _rows(6, (3, shape[0])), _rows(6, (shape[1],), seed=1)
    products = (g.unsqueeze(-1) * a[:, None, None, :]).flatten(0, 1)
    first = CurvatureSketch.new(shape, 2, 1, torch.float64, CPU)
    first.add_rank_one(g, a)
    reference = CurvatureSketch.new(shape, 2, 1, torch.float64, CPU)
    reference.add_rows(products)
    assert_close(first.values, reference.values)
    R = _dense(products)
    if first.exact:
        return
    # The power step's sketch, from the rank-one path and from rows.
    second, rows_second = first.power_step(), first.power_step()
    second.add_rank_one(g, a)
    rows_second.add_rows(products)
    assert_close(second.values, rows_second.values)
    assert_close(_Y(second), R @ second.test)
    assert_close(second.test.mT @ second.test, torch.eye(4, dtype=torch.float64))


def test_eigenpairs_are_nystrom_of_the_second_sketch_and_exact_when_small():
    rows = _rows(40, (6, 8))
    R = _dense(rows)
    first = CurvatureSketch.new((6, 8), 3, 5, torch.float64, CPU)
    first.add_rows(rows)
    second = first.power_step()
    second.add_rows(rows)
    U, S = second.eigenpairs(3, scale=2.0)
    Q1 = torch.linalg.qr(R @ first.omega()).Q
    U_ref, S_ref = lowrank.nystrom_eigenpairs(R @ Q1, Q1, 3)
    assert_close((U * S) @ U.mT, 2 * (U_ref * S_ref) @ U_ref.mT)
    # Ω = I for a block of at most 2k entries: the exact top-k of R.
    small = _rows(10, (2, 3))
    exact = CurvatureSketch.new((2, 3), 3, 5, torch.float64, CPU)
    exact.add_rows(small)
    assert exact.exact
    U, S = exact.eigenpairs(2)
    values, vectors = torch.linalg.eigh(_dense(small))
    assert_close(S, values.flip(0)[:2])
    top = vectors.flip(1)[:, :2]
    assert_close((U * S) @ U.mT, (top * values.flip(0)[:2]) @ top.mT)


def test_one_power_step_finds_the_top_eigenpairs_closer():
    generator = torch.Generator().manual_seed(0)
    # A slowly decaying spectrum, as the benchmark blocks have.
    basis = torch.linalg.qr(torch.randn(120, 120, generator=generator).double()).Q
    spectrum = 1.0 / torch.arange(1, 121, dtype=torch.float64)
    root = basis * spectrum.sqrt()
    rows = root.mT.reshape(120, 10, 12)
    R = _dense(rows)
    best = (basis[:, :4] * spectrum[:4]) @ basis[:, :4].mT
    first = CurvatureSketch.new((10, 12), 4, 0, torch.float64, CPU)
    first.add_rows(rows)
    U1, S1 = lowrank.nystrom_eigenpairs(_Y(first), first.omega(), 4)
    second = first.power_step()
    second.add_rows(rows)
    U2, S2 = second.eigenpairs(4)
    one = torch.linalg.matrix_norm((U1 * S1) @ U1.mT - best)
    two = torch.linalg.matrix_norm((U2 * S2) @ U2.mT - best)
    assert two < 0.7 * one
    # Both are below R (Nyström): diag(R − U S Uᵀ) ≥ 0.
    assert float((R - (U2 * S2) @ U2.mT).diagonal().min()) >= -1e-12


def test_merged_eigenpairs_are_the_top_of_the_sum():
    A, B = _rows(5, (30,)), _rows(4, (30,), seed=1)
    pairs = []
    for rows in (A, B):
        values, vectors = torch.linalg.eigh(_dense(rows))
        pairs.append((vectors.flip(1)[:, :3], values.flip(0)[:3]))
    U, S = merged_eigenpairs(*pairs, rank=4)
    total = sum((U_ * S_) @ U_.mT for U_, S_ in pairs)
    values, vectors = torch.linalg.eigh(total)
    top = vectors.flip(1)[:, :4]
    assert_close(S, values.flip(0)[:4])
    assert_close((U * S) @ U.mT, (top * values.flip(0)[:4]) @ top.mT)


def test_corrected_block_keeps_the_diagonal_and_is_the_dense_construction():
    rows = _rows(20, (4, 5))
    R = _dense(rows)
    values, vectors = torch.linalg.eigh(R)
    U, S = vectors.flip(1)[:, :3], values.flip(0)[:3]
    D, (U_, S_) = corrected_block(R.diagonal().reshape(4, 5), (U, S))
    assert_close(D.flatten() + (U.square() @ S), R.diagonal())
    # In the identity basis the matrix is D + U S Uᵀ itself.
    matrix = corrected_matrix([()], [R.diagonal().reshape(4, 5)], {0: (U, S)})
    assert_close(matrix.to_matrix(), torch.diag(D.flatten()) + (U * S) @ U.mT)
    # A diagonal entry that the pairs overshoot (a subsample's scale) is clamped.
    D, _ = corrected_block(torch.zeros(4, 5, dtype=torch.float64), (U, S))
    assert float(D.min()) == 0.0


def test_transposed_columns_follow_the_transposed_layout():
    U = _rows(12, (2,)).reshape(12, 2)
    moved = transposed_columns(U, (3, 4))
    for column in range(2):
        assert_close(moved[:, column], U[:, column].reshape(3, 4).mT.flatten())


def test_block_seeds_differ_per_block_and_fit_a_generator():
    seeds = {block_seed(2147483647, index) for index in range(50)}
    assert len(seeds) == 50
    assert all(0 <= seed < 2**63 for seed in seeds)
