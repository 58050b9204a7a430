"""Bad input, singular posteriors, memory guards, numerical extremes, devices."""

from __future__ import annotations

import math

import pytest
import torch
from laplace import Laplace
from torch import nn

from ekfac_laplace import EKFACLaplace, EKFACLLLaplace, compute_ekfac
from ekfac_laplace import engine as engine_module
from ekfac_laplace.batches import LaplaceBatches
from tests.cases import CASES, loader


def _model_and_data(seed: int = 0, n: int = 12, dtype=torch.float64):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    X = torch.randn(n, 4, dtype=torch.float64).to(dtype)  # same values for any dtype
    y = torch.randint(0, 3, (n,))
    return model, X, y


def _fitted(subset: str = "all", **options):
    model, X, y = _model_and_data()
    la = Laplace(model, "classification", subset, hessian_structure="ekfac", **options)
    la.fit(loader(X, y))
    return la, X, y


@pytest.mark.parametrize("cls", [EKFACLaplace, EKFACLLLaplace])
@pytest.mark.parametrize(
    "use",
    [
        lambda la, X: la.sample(2),
        lambda la, X: la(X),
        lambda la, X: la(X, pred_type="nn", link_approx="mc", n_samples=2),
        lambda la, X: la.state_dict(),
        lambda la, X: la.posterior_covariance,
        lambda la, X: la.posterior_precision,
        lambda la, X: la.log_marginal_likelihood(),
    ],
)
def test_everything_before_fit_says_fit_first(cls, use):
    model, X, _ = _model_and_data()
    la = cls(model, "classification")
    with pytest.raises(AttributeError, match=r"not fitted: call \.fit"):
        use(la, X)


def test_before_fit_the_posterior_is_the_prior_as_in_kron():
    """laplace-torch's KronLaplace: log det and square norm of the prior unfitted."""
    model, X, _ = _model_and_data()
    la = EKFACLaplace(model, "classification", prior_precision=2.0)
    assert torch.allclose(la.log_det_posterior_precision, la.log_det_prior_precision)
    value = torch.ones(la.n_params, dtype=la.prior_precision.dtype)
    assert la.square_norm(value).item() == pytest.approx(2.0 * la.n_params)


@pytest.mark.parametrize(
    ("attribute", "value", "match"),
    [
        ("prior_precision", -1.0, "prior_precision must be finite and non-negative"),
        ("prior_precision", float("nan"), "prior_precision must be finite"),
        ("prior_precision", torch.tensor([1.0, math.inf]), "prior_precision must be"),
        ("prior_precision", torch.ones(7), "one per parameter tensor"),
        ("prior_precision", torch.ones(2, 2), "scalar or a 1-D tensor"),
        ("temperature", 0.0, "temperature must be one finite, positive number"),
        ("temperature", float("inf"), "temperature must be one finite"),
        ("sigma_noise", -0.5, "sigma_noise must be one finite, positive number"),
        ("sigma_noise", torch.tensor(float("nan")), "sigma_noise must be one finite"),
    ],
)
def test_bad_hyperparameters_are_refused_and_leave_the_object(attribute, value, match):
    la, X, _ = _fitted()
    before = {
        "prior_precision": la.prior_precision.clone(),
        "temperature": la.temperature,
        "sigma_noise": la.sigma_noise.clone(),
    }
    with pytest.raises(ValueError, match=match):
        setattr(la, attribute, value)
    assert torch.equal(la.prior_precision, before["prior_precision"])
    assert la.temperature == before["temperature"]
    assert torch.equal(la.sigma_noise, before["sigma_noise"])
    assert torch.isfinite(la(X)).all()


def test_bad_constructor_values_are_refused():
    model, _, _ = _model_and_data()
    with pytest.raises(ValueError, match="temperature must be"):
        EKFACLaplace(model, "classification", temperature=-1.0)
    with pytest.raises(ValueError, match="sigma_noise must be"):
        EKFACLaplace(model, "regression", sigma_noise=0.0)
    with pytest.raises(ValueError, match="prior_precision must be"):
        EKFACLLLaplace(model, "classification", prior_precision=float("nan"))


def _singular():
    """A linear model whose last input is always zero: zero curvature directions."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    X = torch.randn(10, 4, dtype=torch.float64)
    X[:, 3] = 0.0
    y = torch.randint(0, 3, (10,))
    la = EKFACLaplace(model, "classification", prior_precision=0.0)
    la.fit(loader(X, y))
    return la, X


@pytest.mark.parametrize(
    "use",
    [
        lambda la, X: la.log_det_posterior_precision,
        lambda la, X: la.log_marginal_likelihood(),
        lambda la, X: la.posterior_covariance,
        lambda la, X: la.posterior_variance,
        lambda la, X: la.sample(3),
        lambda la, X: la(X),
    ],
)
def test_singular_posterior_is_refused_with_a_hint(use):
    la, X = _singular()
    with pytest.raises(ValueError, match="singular.*positive prior precision"):
        use(la, X)
    la.prior_precision = 1e-6
    result = use(la, X)
    assert torch.isfinite(result).all()


def test_dense_helpers_refuse_huge_results_unless_forced():
    la, X, _ = _fitted(prior_precision=1.0)
    la.dense_limit_bytes = 1000  # P = 43 parameters: 43² · 8 bytes = 14.8 kB
    with pytest.raises(MemoryError, match=r"shape \(43, 43\) would take"):
        _ = la.posterior_covariance
    with pytest.raises(MemoryError, match="joint predictive covariance"):
        la._glm_predictive_distribution(X, joint=True)
    with pytest.raises(MemoryError, match="limit"):
        la.posterior_precision.to_matrix(max_bytes=1000)
    assert la(X).shape == (12, 3)  # the per-input predictive is not dense
    assert la.posterior_variance.shape == (43,)
    la.dense_limit_bytes = None
    assert la.posterior_covariance.shape == (43, 43)
    assert la._glm_predictive_distribution(X, joint=True)[1].shape == (36, 36)
    # laplace-torch's Jacobian path (enable_backprop=True) is bounded too.
    backprop = Laplace(la.model, "classification", "all", "ekfac", enable_backprop=True)
    backprop.fit(loader(X, torch.zeros(12, dtype=torch.long)))
    backprop.dense_limit_bytes = 1000
    with pytest.raises(MemoryError, match="Jacobian of laplace-torch's predictive"):
        backprop(X)


def test_eigh_failures_are_retried_in_float64(monkeypatch):
    model, X, y = _model_and_data(dtype=torch.float32)
    params = list(model.parameters())

    def fit():
        return compute_ekfac(
            model, params, LaplaceBatches(loader(X, y)), "classification", len(X)
        )

    expected = fit()
    real_eigh = torch.linalg.eigh
    calls = {"float32": 0, "float64": 0}

    def flaky(matrix):
        key = "float64" if matrix.dtype == torch.float64 else "float32"
        calls[key] += 1
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated: eigh did not converge")
        return real_eigh(matrix)

    monkeypatch.setattr(engine_module.torch.linalg, "eigh", flaky)
    retried = fit()
    assert calls["float32"] >= 3 and calls["float64"] == calls["float32"]
    for a, b in zip(retried.eigenvalues, expected.eigenvalues):
        torch.testing.assert_close(a.sum(), b.sum(), rtol=1e-4, atol=1e-6)
    assert all(
        q.dtype == torch.float32 for basis in retried.eigenvectors for q in basis
    )

    def broken(matrix):
        raise torch.linalg.LinAlgError("simulated")

    monkeypatch.setattr(engine_module.torch.linalg, "eigh", broken)
    with pytest.raises(
        RuntimeError,
        match="eigh failed on the .* in float64 and in float64 with a diagonal shift",
    ):
        fit()


@pytest.mark.parametrize("prior", [1e-8, 1e8])
@pytest.mark.parametrize("temperature", [1e-4, 1e4])
def test_extreme_priors_and_temperatures_stay_finite(prior, temperature):
    la, X, _ = _fitted(prior_precision=prior, temperature=temperature)
    assert torch.isfinite(la.log_det_posterior_precision)
    assert torch.isfinite(la.log_marginal_likelihood())
    samples = la.sample(5, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(samples).all()
    for options in (
        {"pred_type": "glm", "link_approx": "probit"},
        {"pred_type": "glm", "link_approx": "mc", "n_samples": 5},
        {"pred_type": "nn", "link_approx": "mc", "n_samples": 5},
    ):
        probs = la(X, **options)
        assert torch.isfinite(probs).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(12, dtype=probs.dtype))


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_float32_agrees_with_float64(subset: str):
    """Stated tolerance: relative 1e-4 for log det, LML and variances; 1e-5 for
    predictive probabilities (float32 has ~7 significant digits)."""
    results = {}
    for dtype in (torch.float64, torch.float32):
        model, X, y = _model_and_data(dtype=dtype)
        la = Laplace(model, "classification", subset, "ekfac", prior_precision=0.5)
        la.fit(loader(X, y))
        assert la.H.eigenvalues[0].dtype == dtype
        assert la.sample(2).dtype == dtype and la(X).dtype == dtype
        results[dtype] = (
            la.log_det_posterior_precision,
            la.log_marginal_likelihood(),
            la.posterior_variance,
            la(X),
        )
    for a, b, rtol in zip(
        results[torch.float32], results[torch.float64], (1e-4, 1e-4, 1e-4, 1e-5)
    ):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=rtol)


def test_monte_carlo_fit_depends_only_on_its_seed():
    case = CASES[0]
    fits = []
    for seed, global_seed in ((7, 0), (7, 1), (8, 0)):
        model, X, y = case.make()
        torch.manual_seed(global_seed)  # the fit must not depend on the global RNG
        la = EKFACLaplace(
            model,
            case.likelihood,
            backend_kwargs={"stochastic": True},
            seed=seed,
        )
        la.fit(loader(X, y))
        fits.append(torch.cat([v.flatten() for v in la.H.eigenvalues]))
    assert torch.equal(fits[0], fits[1])
    assert not torch.equal(fits[0], fits[2])


def _conv_model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 4),
        nn.LayerNorm(4),
        nn.Linear(4, 3),
    ).double()
    return (
        model,
        torch.randn(20, 2, 6, 6, dtype=torch.float64),
        torch.randint(0, 3, (20,)),
    )


def _device_results(device: str, subset: str, conv: bool, stochastic: bool):
    model, X, y = (_conv_model_and_data if conv else _model_and_data)()
    model, X, y = model.to(device), X.to(device), y.to(device)
    la = Laplace(
        model,
        "classification",
        subset,
        "ekfac",
        prior_precision=0.5,
        backend_kwargs={"stochastic": stochastic},
    )
    la.fit(loader(X, y))
    assert all(v.device.type == device for v in la.H.eigenvalues)
    samples = la.sample(4, generator=torch.Generator(device).manual_seed(0))
    assert samples.device.type == device
    la.optimize_prior_precision(method="marglik", n_steps=5)
    probabilities = la(X, pred_type="glm", link_approx="probit")
    return la.log_marginal_likelihood(), probabilities, la.posterior_variance


CUDA_CASES = [
    ("all", False, False),
    ("last_layer", False, False),
    ("all", True, False),  # convolutions, a layer norm's diagonal block
    ("all", True, True),  # ... with the Monte-Carlo Fisher (the sampler on the GPU)
]


@pytest.mark.parametrize(("subset", "conv", "stochastic"), CUDA_CASES[2:])
def test_device_comparison_runs_on_the_cpu(subset: str, conv: bool, stochastic: bool):
    """The CUDA test's body, CPU against CPU: its plumbing is checked everywhere."""
    first = _device_results("cpu", subset, conv, stochastic)
    for a, b in zip(first, _device_results("cpu", subset, conv, stochastic)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("subset", "conv", "stochastic"), CUDA_CASES)
def test_cuda_matches_cpu(subset: str, conv: bool, stochastic: bool):
    cpu = _device_results("cpu", subset, conv, stochastic)
    cuda = _device_results("cuda", subset, conv, stochastic)
    # The Monte-Carlo labels come from each device's own generator: other labels.
    for a, b in zip(cuda, cpu) if not stochastic else ():
        torch.testing.assert_close(a.cpu(), b, rtol=1e-8, atol=1e-10)
    for value in cuda:
        assert torch.isfinite(value).all()


class _OneShot:
    """A loader whose ``__iter__`` hands out one generator: a single pass."""

    def __init__(self, X, y) -> None:
        self.dataset = X
        self.batches = iter([(X[:6], y[:6]), (X[6:], y[6:])])

    def __iter__(self):
        return self.batches


class _Pair(nn.Module):
    """Returns ``(logits, features)``, as many models do."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x), x


def _mistakes(X, y):
    """Common mistakes: (loader, error class, message) — all before the first pass
    except the late label, which the engine catches in its batch."""
    late = y.clone()
    late[-1] = 7  # only in the last batch
    soft = torch.softmax(torch.randn(len(y), 3, dtype=X.dtype), -1)
    soft[-1, 0] = float("nan")  # only in the last batch (index 2)
    return {
        "one-shot iterator": (_OneShot(X, y), ValueError, "one-shot iterator"),
        "NaN soft labels later": (loader(X, soft), ValueError, "targets of batch 2"),
        "model returns a tuple": (
            loader(X, y),
            ValueError,
            r"returns a tuple; .* return one tensor",
        ),
        "empty loader": (loader(X[:0], y[:0]), ValueError, "empty training set"),
        "float class targets": (loader(X, y.double()), ValueError, r"y\.long\(\)"),
        "label out of range": (loader(X, y + 3), ValueError, r"\[0, 3\)"),
        "label out of range later": (loader(X, late), ValueError, r"from \d to 7"),
        "float32 inputs": (loader(X.float(), y), ValueError, "float32 but"),
        "wrong input width": (
            loader(X[:, :3], y),
            RuntimeError,
            r"in module '0', Linear",
        ),
    }


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize(
    "mistake",
    [
        "one-shot iterator",
        "NaN soft labels later",
        "model returns a tuple",
        "empty loader",
        "float class targets",
        "label out of range",
        "label out of range later",
        "float32 inputs",
        "wrong input width",
    ],
)
def test_common_mistakes_say_what_to_do_and_leave_the_object(subset, mistake):
    model, X, y = _model_and_data()
    data, error, match = _mistakes(X, y)[mistake]
    fitted = _Pair(model) if mistake == "model returns a tuple" else model
    la = Laplace(fitted, "classification", subset, hessian_structure="ekfac")
    with pytest.raises(error, match=match):
        la.fit(data)
    assert la.H is None
    if fitted is not model:
        la = Laplace(model, "classification", subset, hessian_structure="ekfac")
    la.fit(loader(X, y))  # usable after the error
    assert torch.isfinite(la.log_marginal_likelihood())


def test_empty_loader_with_a_dataset_is_a_value_error_for_the_last_layer():
    """A dataset with a length but a loader without batches (drop_last)."""
    model, X, y = _model_and_data()
    la = Laplace(model, "classification", "last_layer", hessian_structure="ekfac")
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X[:3], y[:3]), batch_size=5, drop_last=True
    )
    with pytest.raises(ValueError, match="yields no batches"):
        la.fit(data)


class _Shrinking:
    """A loader whose every complete pass yields one batch fewer than the last."""

    def __init__(self, X, y) -> None:
        self.X, self.y, self.dataset, self.complete = X, y, X, 0

    def __iter__(self):
        stop = len(self.X) - 4 * self.complete
        for start in range(0, stop, 4):
            yield self.X[start : start + 4], self.y[start : start + 4]
        self.complete += 1


@pytest.mark.parametrize("engine", ["fast", "curvlinops"])
def test_a_second_pass_over_other_data_is_refused(engine):
    model, X, y = _model_and_data()
    la = EKFACLaplace(model, "classification", cache_budget_bytes=0, engine=engine)
    with pytest.raises(ValueError, match=r"Pass 2 over train_loader yielded 8 ex"):
        la.fit(_Shrinking(X, y))
    assert la.H is None


def test_integer_labels_of_any_width_fit_as_int64():
    model, X, y = _model_and_data()
    reference = EKFACLaplace(model, "classification")
    reference.fit(loader(X, y))
    for dtype in (torch.int32, torch.int16, torch.uint8):
        for engine in ("fast", "curvlinops"):
            la = EKFACLaplace(model, "classification", engine=engine)
            la.fit(loader(X, y.to(dtype)))
            torch.testing.assert_close(
                la.posterior_precision.to_matrix(),
                reference.posterior_precision.to_matrix(),
            )


def test_non_finite_targets_and_prior_means_are_refused():
    model, X, _ = _model_and_data()
    targets = torch.randn(len(X), 3, dtype=X.dtype)
    targets[7, 1] = float("inf")  # batch 1
    for engine, match in (
        ("fast", "targets of batch 1 contain NaN or Inf"),
        ("curvlinops", "summed loss over the training data is not finite"),
    ):
        la = EKFACLaplace(model, "regression", engine=engine)
        with pytest.raises(ValueError, match=match):
            la.fit(loader(X, targets))
        assert la.H is None
    with pytest.raises(ValueError, match="prior_mean must be finite"):
        EKFACLaplace(model, "classification", prior_mean=float("nan"))
    la, X, y = _fitted()
    with pytest.raises(ValueError, match="prior_mean must be finite"):
        la.prior_mean = torch.full((la.n_params,), float("inf"), dtype=X.dtype)
    assert torch.isfinite(la.log_marginal_likelihood())


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_no_inputs_and_no_samples_give_empty_results(subset, likelihood):
    model, X, y = _model_and_data()
    if likelihood == "regression":
        y = torch.randn(len(X), 3, dtype=X.dtype)
    la = Laplace(model, likelihood, subset, hessian_structure="ekfac")
    la.fit(loader(X, y))
    assert la.sample(0).shape == (0, la.n_params)
    if likelihood == "classification":
        assert la(X[:0]).shape == (0, 3)
        assert la(X[:0], link_approx="mc", n_samples=4).shape == (0, 3)
        return
    mean, variance = la(X[:0])
    assert mean.shape == (0, 3) and variance.shape == (0, 3, 3)
    mean, variance = la(X[:0], joint=True)
    assert mean.shape == (0,) and variance.shape == (0, 0)
    mean, variance = la(X[:0], diagonal_output=True)
    assert variance.shape == (0, 3)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_results_come_back_in_the_model_dtype(subset, dtype):
    """Accumulated in float32 (``H`` is float32), returned in the model's dtype,
    and equal to the float32 fit of the same weights to half precision."""
    model, X, y = _model_and_data(dtype=torch.float32)
    results = {}
    for precision in (torch.float32, dtype):
        half = model.to(precision)
        la = Laplace(half, "classification", subset, hessian_structure="ekfac")
        la.fit(loader(X.to(precision), y))
        assert la.H.eigenvalues[0].dtype == torch.float32
        evidence = la.log_marginal_likelihood()
        probs = la(X[:4].to(precision), link_approx="probit")
        samples = la.sample(3)
        nn_probs = la(X[:4].to(precision), pred_type="nn", link_approx="mc")
        for value in (evidence, probs, samples, nn_probs):
            assert value.dtype == precision
        results[precision] = (evidence.float(), probs.float())
    tolerance = 2e-2 if dtype == torch.float16 else 6e-2
    for full, half in zip(results[torch.float32], results[dtype]):
        torch.testing.assert_close(half, full, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_nn_predictive_leaves_the_map_weights(subset, interruption):
    model, X, y = _model_and_data()
    la = Laplace(model, "classification", subset, hessian_structure="ekfac")
    la.fit(loader(X, y))
    network = la.model.model if subset == "last_layer" else model  # LL: a copy
    before = [p.detach().clone() for p in network.parameters()]
    storage = [p.data_ptr() for p in network.parameters()]
    expected = la(X[:3])
    calls = {"n": 0}

    def fail_on_the_third_sample(module, args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise interruption("stop")

    sampled = network[2] if subset == "last_layer" else network[0]  # runs per sample
    handle = sampled.register_forward_pre_hook(fail_on_the_third_sample)
    try:
        with pytest.raises(interruption):
            la(X[:3], pred_type="nn", link_approx="mc", n_samples=5)
    finally:
        handle.remove()
    params = list(network.parameters())
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert [p.data_ptr() for p in params] == storage  # no aliasing of la.mean
    assert torch.equal(la(X[:3]), expected)
