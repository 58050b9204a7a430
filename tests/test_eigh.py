"""``robust_eigh``: never NaN for a finite symmetric matrix, refusals that say why."""

from pathlib import Path

import pytest
import torch

from ekfac_laplace.eigh import robust_eigenvectors, robust_eigh

#: The gradient factor of 'layer4.0.conv1' of torchvision's ResNet-18 (3 classes, 8
#: random 32 × 32 images, seed 0): 512 × 512, rank 324, finite. MKL's float32
#: ``eigh`` returns NaN on it, without raising, on one thread.
RESNET_FACTOR = Path(__file__).parent / "data" / "resnet18_layer4_gradient_factor.pt"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_factor_on_which_float32_eigh_returns_nan_is_decomposed(one_thread):
    factor = torch.load(RESNET_FACTOR)
    assert factor.dtype == torch.float32 and bool(torch.isfinite(factor).all())
    raw_values, raw_vectors = torch.linalg.eigh(factor)
    if bool(torch.isfinite(raw_values).all() and torch.isfinite(raw_vectors).all()):
        pytest.skip("this LAPACK build decomposes the saved factor without NaN")
    values, vectors = robust_eigh(factor, "ResNet factor")
    assert values.dtype == vectors.dtype == torch.float32
    assert bool(torch.isfinite(values).all() and torch.isfinite(vectors).all())
    reference = torch.linalg.eigvalsh(factor.double())
    scale = float(reference.abs().max())
    torch.testing.assert_close(values.double(), reference, rtol=0, atol=1e-5 * scale)
    rebuilt = (vectors.double() * values.double()) @ vectors.double().mT
    torch.testing.assert_close(rebuilt, factor.double(), rtol=0, atol=1e-5 * scale)
    identity = torch.eye(512, dtype=torch.float64)
    torch.testing.assert_close(
        vectors.double().mT @ vectors.double(), identity, rtol=0, atol=1e-5
    )


def test_nan_from_eigh_falls_back_to_float64(monkeypatch):
    """The fallback path alone, wherever LAPACK decomposes the saved factor."""
    torch.manual_seed(0)
    X = torch.randn(6, 4)
    matrix = X @ X.T
    real_eigh = torch.linalg.eigh
    calls = []

    def nan_in_float32(m):
        calls.append(m.dtype)
        values, vectors = real_eigh(m)
        if m.dtype == torch.float32:
            return values * float("nan"), vectors
        return values, vectors

    monkeypatch.setattr(torch.linalg, "eigh", nan_in_float32)
    values, vectors = robust_eigh(matrix, "factor")
    assert calls == [torch.float32, torch.float64]
    assert values.dtype == torch.float32
    torch.testing.assert_close(
        values.double(), torch.linalg.eigvalsh(matrix.double()), rtol=1e-5, atol=1e-5
    )


def test_eigh_failing_every_way_is_refused_with_the_cause(monkeypatch):
    def always_nan(m):
        return torch.full(m.shape[:-1], float("nan")), torch.zeros_like(m)

    monkeypatch.setattr(torch.linalg, "eigh", always_nan)
    with pytest.raises(
        RuntimeError,
        match=r"eigh failed on the Kronecker input factor of layer 'x' \(it did not "
        r"converge or returned NaN\) in torch.float32, in float64 and in float64 "
        "with a diagonal shift: the matrix is finite but numerically degenerate",
    ):
        robust_eigh(torch.eye(3), "Kronecker input factor of layer 'x'")


def test_robust_eigenvectors_refuses_non_finite_factors():
    with pytest.raises(ValueError, match="input factor of layer 'x' is not finite"):
        robust_eigenvectors(
            torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "input factor of layer 'x'"
        )


def test_robust_eigh_takes_its_shift_off_the_eigenvalues(monkeypatch):
    """On the fallback path (float64, then shifted) the eigenvalues are the
    matrix's own, to float32 precision; the stack keeps one shift per matrix."""
    torch.manual_seed(0)
    X = torch.randn(3, 5, 4)
    matrices = X @ X.mT  # rank 4 of 5: one zero eigenvalue each
    expected = torch.linalg.eigvalsh(matrices.double())
    real_eigh = torch.linalg.eigh
    calls = []

    def flaky(matrix):  # fails but for a shifted float64 matrix
        calls.append(matrix.dtype)
        if len(calls) < 3:
            raise torch.linalg.LinAlgError("simulated")
        return real_eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    values, vectors = robust_eigh(matrices, "stack")
    assert calls == [torch.float32, torch.float64, torch.float64]
    assert values.dtype == vectors.dtype == torch.float32
    torch.testing.assert_close(values.double(), expected, rtol=1e-5, atol=1e-5)
    rebuilt = (vectors * values.unsqueeze(-2)) @ vectors.mT
    torch.testing.assert_close(rebuilt, matrices, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_large_matrix_of_low_rank_takes_the_low_rank_path(dtype, monkeypatch):
    """No full eigh: an orthonormal basis whose first columns span the null space
    and whose eigenvalues rebuild the matrix to the dtype's precision."""
    torch.manual_seed(0)
    rows = torch.randn(5, 1500, dtype=torch.float64)
    matrix = (rows.T @ rows).to(dtype)
    sizes = []
    real_eigh = torch.linalg.eigh

    def recorded(m):
        sizes.append(m.shape[-1])
        return real_eigh(m)

    monkeypatch.setattr(torch.linalg, "eigh", recorded)
    values, vectors = robust_eigh(matrix, "factor")
    assert sizes == [64]  # the projected matrix only
    assert values.dtype == vectors.dtype == dtype
    assert bool((values[1:] >= values[:-1]).all())
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    scale = float(matrix.double().norm())
    q, v = vectors.double(), values.double()
    torch.testing.assert_close(
        (q * v) @ q.T, matrix.double(), rtol=0, atol=tolerance * scale
    )
    identity = torch.eye(1500, dtype=torch.float64)
    torch.testing.assert_close(q.T @ q, identity, rtol=0, atol=tolerance * 10)
    reference = torch.linalg.eigvalsh(matrix.double())
    torch.testing.assert_close(v, reference, rtol=0, atol=tolerance * scale)


def test_a_large_matrix_of_full_rank_takes_eigh():
    torch.manual_seed(0)
    rows = torch.randn(1100, 1024, dtype=torch.float64)
    matrix = rows.T @ rows
    values, vectors = robust_eigh(matrix, "factor")
    expected_values, expected_vectors = torch.linalg.eigh(matrix)
    torch.testing.assert_close(values, expected_values)
    torch.testing.assert_close(vectors.abs(), expected_vectors.abs())
