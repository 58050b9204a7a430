"""EKFACLaplace / EKFACLLLaplace against dense references and laplace-torch."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from laplace import KronLaplace, Laplace
from laplace.curvature import AsdlGGN, CurvlinopsEF, CurvlinopsGGN, CurvlinopsHessian
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import ekfac_laplace
from ekfac_laplace import EKFACLaplace, EKFACLLLaplace
from tests.cases import (
    CASE_IDS,
    CASES,
    Case,
    DictDataset,
    last_layer_params,
    loader,
    reward_data,
)
from tests.utils import (
    assert_close,
    blocks,
    dense_empirical_fisher,
    dense_ggn,
    ekfac_in_basis,
    glm_log_likelihood,
    jacobians,
    reference_ekfac,
)

SUBSETS = ["all", "last_layer"]


def _params(model: nn.Module, subset: str) -> list[torch.Tensor]:
    return list(model.parameters()) if subset == "all" else last_layer_params(model)


def _settings(case: Case, subset: str, n_blocks: int) -> dict:
    """Non-trivial hyper-parameters: per-layer prior, σ and T for regression."""
    prior = torch.linspace(0.5, 2.0, n_blocks, dtype=torch.float64)
    settings = {"prior_precision": prior, "temperature": 0.7}
    if case.likelihood == "regression":
        settings["sigma_noise"] = 0.6
    return settings


def _fitted(case: Case, subset: str, **overrides):
    model, X, y = case.make()
    params = _params(model, subset)
    settings = _settings(case, subset, len(params))
    settings.update(overrides)
    la = Laplace(
        model,
        case.likelihood,
        subset_of_weights=subset,
        hessian_structure="ekfac",
        kfac_approx=case.kfac_approx,
        **settings,
    )
    la.fit(loader(X, y))
    return la, model, params, X, y


def _dense_posterior(la, model, params, X, fisher_type="type2", y=None):
    """``P = H_ekfac / (σ² T) + diag(p0)``; H from the exact blocks in la's basis."""
    if fisher_type == "type2":
        full = dense_ggn(model, params, X, la.likelihood)
    else:
        full = dense_empirical_fisher(model, params, X, y, la.likelihood)
    sizes = [p.numel() for p in params]
    H = torch.block_diag(
        *[
            ekfac_in_basis(b, basis)
            for b, basis in zip(blocks(full, sizes), la.H.eigenvectors)
        ]
    )
    h = 1 / (la.sigma_noise.item() ** 2 * la.temperature)
    prior = torch.cat(
        [
            p0 * torch.ones(size, dtype=torch.float64)
            for p0, size in zip(la.prior_precision.expand(len(sizes)), sizes)
        ]
    )
    return h * H + torch.diag(prior), prior


def test_import_registers_ekfac_with_the_factory():
    model, _, _ = CASES[0].make()
    assert isinstance(
        Laplace(model, "classification", "all", hessian_structure="ekfac"), EKFACLaplace
    )
    assert isinstance(
        Laplace(model, "classification", "last_layer", hessian_structure="ekfac"),
        EKFACLLLaplace,
    )
    assert EKFACLaplace._key == ("all", "ekfac")
    assert EKFACLLLaplace._key == ("last_layer", "ekfac")
    assert ekfac_laplace.__version__


@pytest.mark.parametrize("engine", ["fast", "curvlinops"])
@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_posterior_matches_dense(case: Case, subset: str, engine: str):
    la, model, params, X, y = _fitted(case, subset, engine=engine)
    assert la.options.engine == engine
    P, prior = _dense_posterior(la, model, params, X)
    Sigma = torch.linalg.inv(P)
    assert_close(la.posterior_precision.to_matrix(), P)
    assert_close(la.posterior_covariance, Sigma)
    assert_close(la.posterior_variance, torch.diagonal(Sigma))
    assert_close(la.posterior_precision.diag(), torch.diagonal(P))
    assert_close(la.log_det_posterior_precision, torch.linalg.slogdet(P).logabsdet)
    assert_close(la.log_det_prior_precision, prior.log().sum())
    for exponent in (1, -1, -0.5):
        W = torch.randn(3, 2, la.n_params, dtype=torch.float64)
        evals, evecs = torch.linalg.eigh(P)
        powered = (evecs * evals.pow(exponent)) @ evecs.T
        assert_close(la.posterior_precision.bmm(W, exponent), W @ powered)
    value = la.mean + torch.randn(la.n_params, dtype=torch.float64)
    delta = value - la.mean
    assert_close(la.square_norm(value), delta @ P @ delta)
    expected_log_prob = (
        -la.n_params / 2 * math.log(2 * math.pi)
        + torch.linalg.slogdet(P).logabsdet / 2
        - delta @ P @ delta / 2
    )
    assert_close(la.log_prob(value), expected_log_prob)


@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_glm_predictive_matches_dense(case: Case, subset: str):
    la, model, params, X, y = _fitted(case, subset)
    P, _ = _dense_posterior(la, model, params, X)
    Sigma = torch.linalg.inv(P)
    J, f = jacobians(model, params, X[:4])
    expected_var = J @ Sigma @ J.transpose(1, 2)
    f_mu, f_var = la._glm_predictive_distribution(X[:4])
    assert_close(f_mu, f)
    assert_close(f_var, expected_var)
    assert_close(la.functional_variance(J), expected_var)
    flat = J.reshape(-1, J.shape[-1])
    assert_close(la.functional_covariance(J), flat @ Sigma @ flat.T)
    if case.likelihood == "regression":
        mean, var = la(X[:4], pred_type="glm")
        assert_close(mean, f)
        assert_close(var, expected_var)
        mean, cov = la(X[:4], pred_type="glm", joint=True)
        assert_close(mean, f.flatten())
        assert_close(cov, flat @ Sigma @ flat.T)
    else:
        probs = la(X[:4], pred_type="glm", link_approx="probit")
        kappa = 1 / torch.sqrt(
            1 + math.pi / 8 * torch.diagonal(expected_var, dim1=1, dim2=2)
        )
        assert_close(probs, torch.softmax(kappa * f, dim=-1))


@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_log_marginal_likelihood_matches_dense_and_is_differentiable(
    case: Case, subset: str
):
    la, model, params, X, y = _fitted(case, subset)
    n_blocks = len(params)
    prior = torch.linspace(0.3, 1.7, n_blocks, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    regression = case.likelihood == "regression"
    lml = la.log_marginal_likelihood(prior, sigma if regression else None)
    lml.backward()

    dense_prior = prior.detach().clone().requires_grad_(True)
    dense_sigma = sigma.detach().clone().requires_grad_(True)
    full = dense_ggn(model, params, X, case.likelihood)
    sizes = [p.numel() for p in params]
    H = torch.block_diag(
        *[ekfac_in_basis(b, q) for b, q in zip(blocks(full, sizes), la.H.eigenvectors)]
    )
    s = dense_sigma if regression else torch.tensor(1.0, dtype=torch.float64)
    prior_diag = torch.cat(
        [p0 * torch.ones(n, dtype=torch.float64) for p0, n in zip(dense_prior, sizes)]
    )
    P = H / (s**2 * la.temperature) + torch.diag(prior_diag)
    theta = torch.cat([p.detach().flatten() for p in params])
    with torch.no_grad():
        f = model(X)
    if regression:
        log_lik = -0.5 * (
            (f - y) ** 2
        ).sum() / s**2 / la.temperature - f.numel() * torch.log(
            s * math.sqrt(2 * math.pi)
        )
    else:
        log_lik = glm_log_likelihood(f, y, "classification", 1.0, la.temperature)
    expected = log_lik - 0.5 * (
        torch.linalg.slogdet(P).logabsdet
        - prior_diag.log().sum()
        + theta @ (prior_diag * theta)
    )
    expected.backward()
    assert_close(lml, expected)
    assert_close(prior.grad, dense_prior.grad)
    if regression:
        assert_close(sigma.grad, dense_sigma.grad)


@pytest.mark.parametrize("subset", SUBSETS)
def test_samples_have_the_posterior_mean_and_covariance(subset: str):
    case = CASES[0]
    la, model, params, X, y = _fitted(case, subset)
    generator = torch.Generator().manual_seed(0)
    n = 40_000
    samples = la.sample(n, generator=generator)
    assert samples.shape == (n, la.n_params)
    Sigma = la.posterior_covariance
    std_err_mean = torch.sqrt(torch.diagonal(Sigma) / n)
    assert ((samples.mean(0) - la.mean).abs() / std_err_mean).max() < 5
    centred = samples - la.mean
    empirical = centred.T @ centred / n
    variance_of_entries = (
        torch.outer(torch.diagonal(Sigma), torch.diagonal(Sigma)) + Sigma**2
    ) / n
    assert ((empirical - Sigma).abs() / variance_of_entries.sqrt()).max() < 6
    # Reproducible under a generator, and exactly θ* + Q diag((hλ+δ)^-½) z.
    z = torch.randn(
        3, la.n_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    expected = la.mean + la.posterior_precision.eigenbasis_matmul(z, -0.5)
    assert_close(la.sample(3, generator=torch.Generator().manual_seed(1)), expected)


@pytest.mark.parametrize("structure", ["scalar", "layerwise"])
@pytest.mark.parametrize("subset", SUBSETS)
def test_marglik_prior_tuning_finds_a_maximum(subset: str, structure: str):
    la, *_ = _fitted(CASES[0], subset, prior_precision=1.0)
    la.optimize_prior_precision(
        method="marglik", prior_structure=structure, n_steps=300, lr=0.1
    )
    found = la.prior_precision.clone()
    assert len(found) == (1 if structure == "scalar" else la.n_layers)
    best = la.log_marginal_likelihood(found).item()
    for index in range(len(found)):
        for factor in (1.2, 1 / 1.2):
            moved = found.clone()
            moved[index] *= factor
            assert la.log_marginal_likelihood(moved).item() <= best + 1e-8


@pytest.mark.parametrize("subset", SUBSETS)
def test_gridsearch_prior_tuning_picks_the_best_validation_nll(subset: str):
    la, model, params, X, y = _fitted(CASES[0], subset, prior_precision=1.0)
    val = loader(X, y, batch_size=12)
    la.optimize_prior_precision(
        method="gridsearch",
        val_loader=val,
        grid_size=5,
        log_prior_prec_min=-2,
        log_prior_prec_max=2,
    )
    chosen = la.prior_precision.item()
    nll = {}
    for prior in torch.logspace(-2, 2, 5):
        la.prior_precision = prior
        probs = la(X, pred_type="glm", link_approx="probit")
        nll[prior.item()] = -probs[torch.arange(len(y)), y].log().mean().item()
    assert chosen == pytest.approx(min(nll, key=nll.get))


def test_diagonal_prior_is_refused_without_changing_the_prior():
    la, *_ = _fitted(CASES[0], "all", prior_precision=1.0)
    before = la.prior_precision.clone()
    with pytest.raises(ValueError, match="prior_structure='diag' is not supported"):
        la.optimize_prior_precision(method="marglik", prior_structure="diag")
    with pytest.raises(ValueError, match="init_prior_prec has 67 values"):
        la.optimize_prior_precision(init_prior_prec=torch.ones(67, dtype=torch.float64))
    with pytest.raises(ValueError, match="A diagonal"):
        la.prior_precision = torch.ones(la.n_params, dtype=torch.float64)
    assert torch.equal(la.prior_precision, before)


@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=[CASE_IDS[0], CASE_IDS[3]])
def test_every_predictive_path_runs(case: Case, subset: str):
    la, model, params, X, y = _fitted(case, subset)
    x = X[:5]
    generator = torch.Generator().manual_seed(0)
    if case.likelihood == "classification":
        for link in ("probit", "bridge", "bridge_norm", "mc"):
            probs = la(x, pred_type="glm", link_approx=link, n_samples=50)
            assert probs.shape == (5, case.n_outputs)
            assert_close(
                probs.sum(-1), torch.ones(5, dtype=torch.float64), "float64_loose"
            )
        probs = la(x, pred_type="nn", link_approx="mc", n_samples=20)
        assert_close(probs.sum(-1), torch.ones(5, dtype=torch.float64), "float64_loose")
    else:
        mean, var = la(x, pred_type="nn", link_approx="mc", n_samples=20)
        assert mean.shape == (5, case.n_outputs) and var.shape == (5, case.n_outputs)
    for pred_type in ("glm", "nn"):
        fs = la.functional_samples(
            x, pred_type=pred_type, n_samples=7, generator=generator
        )
        assert fs.shape == (7, 5, case.n_outputs)
        ps = la.predictive_samples(
            x, pred_type=pred_type, n_samples=7, generator=generator
        )
        assert ps.shape == (7, 5, case.n_outputs)
    # nn sampling restores the MAP parameters.
    assert_close(la._mean_vector(), la.mean)


@pytest.mark.parametrize("subset", SUBSETS)
def test_state_dict_round_trip_gives_identical_predictions(subset: str):
    case = CASES[0]
    la, model, params, X, y = _fitted(case, subset)
    la.optimize_prior_precision(method="marglik", n_steps=10)
    state = la.state_dict()
    # laplace-torch's serialization contract: plain values only, no pickled classes.
    for value in state.values():
        if value is not None:
            assert isinstance(value, (list, tuple, int, float, str, bool, torch.Tensor))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = Laplace(
        model,
        case.likelihood,
        subset_of_weights=subset,
        hessian_structure="ekfac",
        temperature=la.temperature,  # laplace-torch warns on a different one
        engine="curvlinops",
    )
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.options == la.options  # restored whole from the state
    x = X[:4]
    assert torch.equal(la(x, pred_type="glm"), restored(x, pred_type="glm"))
    assert torch.equal(
        la.sample(3, generator=torch.Generator().manual_seed(0)),
        restored.sample(3, generator=torch.Generator().manual_seed(0)),
    )
    assert torch.equal(la.log_marginal_likelihood(), restored.log_marginal_likelihood())


def test_load_state_dict_refuses_foreign_states_and_keeps_the_object():
    case = CASES[0]
    la, model, params, X, y = _fitted(case, "all")
    state = la.state_dict()
    fresh = Laplace(model, case.likelihood, "all", hessian_structure="ekfac")
    kron = Laplace(model, case.likelihood, "all", hessian_structure="kron")
    kron.fit(loader(X, y))
    with pytest.raises(ValueError, match="from 'KronLaplace'"):
        fresh.load_state_dict(kron.state_dict())
    regression = Laplace(model, "regression", "all", hessian_structure="ekfac")
    with pytest.raises(ValueError, match="likelihood 'classification'"):
        regression.load_state_dict(state)
    other_model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    other = Laplace(other_model, case.likelihood, "all", hessian_structure="ekfac")
    with pytest.raises(ValueError, match="blocks have sizes"):
        other.load_state_dict(state)
    assert other.H is None and fresh.H is None
    with pytest.raises(AttributeError, match="not fitted"):
        _ = fresh.posterior_precision
    missing = {key: value for key, value in state.items() if key != "cls_name"}
    with pytest.raises(KeyError, match="cls_name"):
        fresh.load_state_dict(missing)
    assert fresh.H is None


def test_online_fit_keeps_the_basis_and_adds_eigenvalues():
    case = CASES[0]
    model, X, y = case.make()
    la = Laplace(model, case.likelihood, "all", hessian_structure="ekfac")
    la.fit(loader(X, y))
    first = [v.clone() for v in la.H.eigenvalues]
    basis = la.H.eigenvectors
    loss, n_data = la.loss.clone(), la.n_data
    la.fit(loader(X, y), override=False)
    for old, new in zip(first, la.H.eigenvalues):
        torch.testing.assert_close(new, 2 * old, rtol=1e-13, atol=0)
    for new_basis, old_basis in zip(la.H.eigenvectors, basis):
        assert all(torch.equal(a, b) for a, b in zip(new_basis, old_basis))
    assert la.n_data == 2 * n_data
    assert_close(la.loss, 2 * loss)

    # A then B: diag(Qᵀ (GGN_A + GGN_B) Q) in A's basis.
    la = Laplace(model, case.likelihood, "all", hessian_structure="ekfac")
    la.fit(loader(X[:6], y[:6]))
    la.fit(loader(X[6:], y[6:]), override=False)
    params = list(model.parameters())
    full = dense_ggn(model, params, X[:6], case.likelihood) + dense_ggn(
        model, params, X[6:], case.likelihood
    )
    sizes = [p.numel() for p in params]
    for block, basis, values in zip(
        blocks(full, sizes), la.H.eigenvectors, la.H.eigenvalues
    ):
        Q = torch.kron(*basis) if len(basis) == 2 else basis[0]
        assert_close(values.flatten(), torch.diagonal(Q.T @ block @ Q))
    assert la.n_data == 12


def test_last_layer_online_fit_is_refused():
    la, model, params, X, y = _fitted(CASES[0], "last_layer")
    with pytest.raises(ValueError, match="override=False"):
        la.fit(loader(X, y), override=False)


def test_backends_select_the_fisher_type():
    case = CASES[0]
    model, X, y = case.make()
    params = list(model.parameters())
    la = Laplace(
        model, case.likelihood, "all", hessian_structure="ekfac", backend=CurvlinopsEF
    )
    assert la.options.fisher_type == "empirical"
    la.fit(loader(X, y))
    P, _ = _dense_posterior(la, model, params, X, "empirical", y)
    assert_close(la.posterior_precision.to_matrix(), P)

    mc = [
        Laplace(
            model,
            case.likelihood,
            "all",
            hessian_structure="ekfac",
            backend=CurvlinopsGGN,
            backend_kwargs={"stochastic": True},
            seed=5,
        )
        for _ in range(2)
    ]
    for la in mc:
        assert la.options.fisher_type == "mc"
        la.fit(loader(X, y))
    assert torch.equal(
        mc[0].posterior_precision.to_matrix(), mc[1].posterior_precision.to_matrix()
    )
    assert (
        Laplace(
            model,
            case.likelihood,
            "all",
            hessian_structure="ekfac",
            asdl_fisher_kwargs={"kfac_approx": "reduce"},
        ).options.kfac_approx
        == "reduce"
    )
    ll = Laplace(
        model,
        case.likelihood,
        "last_layer",
        hessian_structure="ekfac",
        backend=CurvlinopsGGN,
        backend_kwargs={"stochastic": True},
        mc_samples=3,
        kfac_approx="reduce",
        seed=1,
    )
    options = ll.options
    assert (
        options.fisher_type,
        options.mc_samples,
        options.kfac_approx,
        options.seed,
    ) == (
        "mc",
        3,
        "reduce",
        1,
    )

    assert (
        Laplace(
            model, case.likelihood, "all", hessian_structure="ekfac", backend=AsdlGGN
        ).options.fisher_type
        == "type2"
    )
    with pytest.raises(ValueError, match="does not support the backend Curvlinops"):
        Laplace(
            model,
            case.likelihood,
            "all",
            hessian_structure="ekfac",
            backend=CurvlinopsHessian,
        )
    with pytest.raises(ValueError, match="asdl_fisher_kwargs keys"):
        Laplace(
            model,
            case.likelihood,
            "all",
            hessian_structure="ekfac",
            asdl_fisher_kwargs={"damping": 1.0},
        )
    with pytest.raises(ValueError, match="Unknown engine"):
        Laplace(model, case.likelihood, "all", hessian_structure="ekfac", engine="x")
    with pytest.raises(ValueError, match="cache_budget_bytes"):
        Laplace(
            model,
            case.likelihood,
            "last_layer",
            hessian_structure="ekfac",
            cache_budget_bytes=-1,
        )
    with pytest.raises(ValueError, match="Invalid likelihood type 'ranking'"):
        EKFACLaplace(model, "ranking")


def test_matches_laplace_torch_kron_scale():
    """Our dense KFAC reference has the scale of laplace-torch's KronLaplace, and
    EKFACLaplace equals KronLaplace where KFAC is exact (one point, one output)."""
    case = CASES[2]  # regression, one output
    model, X, y = case.make()
    params = list(model.parameters())
    kron = KronLaplace(model, "regression", sigma_noise=0.6, prior_precision=0.0)
    kron.fit(loader(X, y))
    ref = reference_ekfac(model, params, X, y, "regression")
    h = 1 / 0.36
    assert_close(
        kron.posterior_precision.to_matrix(), h * torch.block_diag(*ref["kfac"])
    )

    single_X, single_y = X[:1], y[:1]
    kron = KronLaplace(model, "regression", sigma_noise=0.6, prior_precision=0.5)
    kron.fit(loader(single_X, single_y))
    ekfac = EKFACLaplace(model, "regression", sigma_noise=0.6, prior_precision=0.5)
    ekfac.fit(loader(single_X, single_y))
    assert_close(
        ekfac.posterior_precision.to_matrix(), kron.posterior_precision.to_matrix()
    )
    assert_close(ekfac.log_marginal_likelihood(), kron.log_marginal_likelihood())


def test_frozen_parameters_are_left_out():
    case = CASES[0]
    model, X, y = case.make()
    model[0].weight.requires_grad_(False)
    la = Laplace(model, case.likelihood, "all", hessian_structure="ekfac")
    la.fit(loader(X, y))
    params = [p for p in model.parameters() if p.requires_grad]
    assert la.n_params == sum(p.numel() for p in params) == 5 + 15 + 3
    P, _ = _dense_posterior(la, model, params, X)
    assert_close(la.posterior_precision.to_matrix(), P)


class _NoLength(IterableDataset):
    def __iter__(self):
        yield torch.zeros(4, dtype=torch.float64), torch.tensor(0)


def test_fit_errors_leave_the_object_unchanged():
    case = CASES[0]
    la, model, params, X, y = _fitted(case, "all")
    H, mean = la.H, la.mean
    empty = DataLoader(TensorDataset(X[:0], y[:0]), batch_size=4)
    with pytest.raises(ValueError, match="empty training set"):
        la.fit(empty)
    with pytest.raises(ValueError, match="dataset with a length"):
        la.fit(DataLoader(_NoLength(), batch_size=1))
    with pytest.raises(ValueError, match="Classification targets"):
        la.fit(loader(X, y.reshape(-1, 1).double()))
    reg = Laplace(model, "regression", "all", hessian_structure="ekfac")
    with pytest.raises(ValueError, match=r"y.reshape\(-1, 1\)"):
        reg.fit(loader(X, torch.randn(len(X), dtype=torch.float64)))
    seq = nn.Sequential(nn.Linear(4, 3), nn.Unflatten(1, (1, 3))).double()
    with pytest.raises(ValueError, match="outputs of shape"):
        Laplace(seq, "classification", "all", hessian_structure="ekfac").fit(
            loader(X, y)
        )
    assert la.H is H and la.mean is mean


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"cache_budget_bytes": 0}, ["Kronecker factors", "eigenvalue correction"]),
        ({}, ["Kronecker factors"]),  # a tiny problem fits the default cache
        ({"engine": "curvlinops"}, ["KFAC matrices", "Eigenvalue correction"]),
    ],
)
def test_progress_bar_covers_every_pass(capsys, options, expected):
    case = CASES[0]
    model, X, y = case.make()
    la = Laplace(model, case.likelihood, "all", hessian_structure="ekfac", **options)
    la.fit(loader(X, y), progress_bar=True)
    err = capsys.readouterr().err
    assert all(text in err for text in expected)


def test_float32_smoke():
    case = CASES[0]
    model, X, y = case.make()
    la64 = Laplace(model, case.likelihood, "all", hessian_structure="ekfac")
    la64.fit(loader(X, y))
    model32 = copy.deepcopy(model).float()
    la32 = Laplace(model32, case.likelihood, "all", hessian_structure="ekfac")
    la32.fit(loader(X.float(), y))
    assert la32.posterior_precision.to_matrix().dtype == torch.float32
    torch.testing.assert_close(
        la32.posterior_precision.to_matrix().double(),
        la64.posterior_precision.to_matrix(),
        rtol=1e-4,
        atol=1e-5,
    )
    torch.testing.assert_close(
        la32.log_marginal_likelihood().double(),
        la64.log_marginal_likelihood(),
        rtol=1e-5,
        atol=1e-4,
    )


@pytest.mark.parametrize("subset", SUBSETS)
def test_prior_precision_diag_repeats_the_prior_per_block(subset: str):
    la, model, params, X, y = _fitted(CASES[0], subset)
    sizes = torch.tensor([p.numel() for p in params])
    assert_close(
        la.prior_precision_diag, torch.repeat_interleave(la.prior_precision, sizes)
    )
    la.prior_precision = 0.3
    assert_close(
        la.prior_precision_diag, torch.full((la.n_params,), 0.3, dtype=torch.float64)
    )


def test_scatter_and_prior_mean_enter_the_marginal_likelihood():
    case = CASES[0]
    model, X, y = case.make()
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    prior_mean = torch.linspace(-0.2, 0.3, n_params, dtype=torch.float64)
    prior = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    la = Laplace(
        model,
        case.likelihood,
        "all",
        hessian_structure="ekfac",
        prior_mean=prior_mean,
        prior_precision=prior,
    )
    la.fit(loader(X, y))
    theta = torch.cat([p.detach().flatten() for p in params])
    prior_diag = torch.repeat_interleave(
        prior, torch.tensor([p.numel() for p in params])
    )
    expected_scatter = (theta - prior_mean) @ (prior_diag * (theta - prior_mean))
    assert_close(la.scatter, expected_scatter)
    P, _ = _dense_posterior(la, model, params, X)
    with torch.no_grad():
        log_lik = glm_log_likelihood(model(X), y, "classification", 1.0, 1.0)
    expected = log_lik - 0.5 * (
        torch.linalg.slogdet(P).logabsdet - prior_diag.log().sum() + expected_scatter
    )
    assert_close(la.log_marginal_likelihood(), expected)


class _DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, batch):
        return self.net(batch["input_ids"] if isinstance(batch, dict) else batch)


@pytest.mark.parametrize("subset", SUBSETS)
def test_dict_batches_give_the_same_posterior(subset: str):
    torch.manual_seed(0)
    model = _DictModel().double()
    X = torch.randn(12, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    dict_loader = DataLoader(DictDataset(X, y), batch_size=5)
    la_dict = Laplace(model, "classification", subset, hessian_structure="ekfac")
    la_dict.fit(dict_loader)
    la_tensor = Laplace(model, "classification", subset, hessian_structure="ekfac")
    la_tensor.fit(loader(X, y))
    assert_close(
        la_dict.posterior_precision.to_matrix(),
        la_tensor.posterior_precision.to_matrix(),
    )
    assert_close(la_dict.loss, la_tensor.loss)


def test_loader_without_batches_and_dict_without_targets_are_refused():
    case = CASES[0]
    model, X, y = case.make()
    la = Laplace(model, case.likelihood, "all", hessian_structure="ekfac")
    no_batches = DataLoader(TensorDataset(X[:3], y[:3]), batch_size=5, drop_last=True)
    with pytest.raises(ValueError, match="yields no batches"):
        la.fit(no_batches)
    dict_model = _DictModel().double()
    la = Laplace(
        dict_model,
        "classification",
        "all",
        hessian_structure="ekfac",
        dict_key_y="targets",
    )
    with pytest.raises(KeyError, match="no target key 'targets'.*set dict_key_y"):
        la.fit(DataLoader(DictDataset(X, y), batch_size=5))
    assert la.H is None


def test_state_without_ekfac_factors_is_refused():
    la, *_ = _fitted(CASES[0], "all")
    state = la.state_dict()
    state["H"] = None
    with pytest.raises(ValueError, match="no EKFAC eigenvectors"):
        la.load_state_dict(state)


@pytest.mark.parametrize("fisher_type", ["type2", "empirical"])
@pytest.mark.parametrize("subset", SUBSETS)
def test_reward_modeling_fits_as_classification_and_predicts_as_regression(
    subset: str, fisher_type: str
):
    """laplace-torch's semantics: the curvature of the pairwise classification
    likelihood, each pair one example; rewards predicted as regression outputs."""
    model, pairs, preferred, X_test = reward_data()
    params = _params(model, subset)
    backend = CurvlinopsGGN if fisher_type == "type2" else CurvlinopsEF
    la = Laplace(
        model,
        "reward_modeling",
        subset,
        hessian_structure="ekfac",
        backend=backend,
        prior_precision=0.7,
    )
    la.fit(loader(pairs, preferred))
    assert la.n_outputs == 2 and la.n_data == len(pairs)
    P, _ = _dense_posterior(la, model, params, pairs, fisher_type, preferred)
    assert_close(la.posterior_precision.to_matrix(), P)
    reference = reference_ekfac(
        model, params, pairs, preferred, "classification", fisher_type
    )
    ekfac = torch.block_diag(*reference["ekfac"])
    prior = 0.7 * torch.eye(len(P), dtype=torch.float64)
    assert_close(la.posterior_precision.to_matrix(), ekfac + prior)
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(pairs), preferred, reduction="sum")
    assert_close(la.log_likelihood, -loss)

    Sigma = torch.linalg.inv(P)
    J, f = jacobians(model, params, X_test)
    mean, var = la(X_test, pred_type="glm")
    assert_close(mean, f)
    assert_close(var, J @ Sigma @ J.transpose(1, 2))
    assert var.shape == (len(X_test), 1, 1)
    mean, var = la(X_test, pred_type="nn", link_approx="mc", n_samples=4)
    assert mean.shape == var.shape == (len(X_test), 1)
    # Jacobian-free for the last layer too (laplace-torch's KronLLLaplace fails).
    probs = la(pairs[:3], pred_type="glm", fitting=True)
    assert probs.shape == (3, 2)
    assert_close(probs.sum(-1), torch.ones(3, dtype=torch.float64))
    J_pairs, f_pairs = jacobians(model, params, pairs[:3])
    var_pairs = J_pairs @ Sigma @ J_pairs.transpose(1, 2)
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * torch.diagonal(var_pairs, dim1=1, dim2=2))
    assert_close(probs, torch.softmax(kappa * f_pairs, dim=-1))


def test_reward_model_with_interleaved_pairs_is_refused():
    """Rows of one example that are not consecutive would mix the per-example
    gradients: the weighted check on the first batch refuses them (a fold of
    ``m`` rows per example is taken to be consecutive: no probing passes)."""
    model, pairs, preferred, _ = reward_data()
    interleaved = copy.deepcopy(model)
    interleaved.interleave = True
    la = Laplace(interleaved, "reward_modeling", "all", hessian_structure="ekfac")
    with pytest.raises(ValueError, match="not consecutive"):
        la.fit(loader(pairs, preferred))
    assert la.H is None
    curvlinops = Laplace(
        model, "reward_modeling", "all", hessian_structure="ekfac", engine="curvlinops"
    )
    with pytest.raises(ValueError, match="sees 10 rows for a batch of 5.*'fast'"):
        curvlinops.fit(loader(pairs, preferred))


def test_last_layer_functional_variance_fast_is_the_diagonal_predictive():
    """laplace-torch's hook for a fast diagonal predictive, also with the dense
    path (``enable_backprop=True``), which must not call the hook back."""
    case = CASES[0]
    la, model, params, X, y = _fitted(case, "last_layer")
    P, _ = _dense_posterior(la, model, params, X)
    J, f = jacobians(model, params, X[:4])
    expected = torch.diagonal(J @ torch.linalg.inv(P) @ J.transpose(1, 2), 0, 1, 2)
    f_mu, f_var = la.functional_variance_fast(X[:4])
    assert_close(f_mu, f)
    assert_close(f_var, expected)
    la.enable_backprop = True
    f_mu, f_var = la._glm_predictive_distribution(X[:4], diagonal_output=True)
    assert_close(f_var.detach(), expected)
    f_mu, f_var = la.functional_variance_fast(X[:4])
    assert_close(f_var.detach(), expected)


def test_curvature_with_other_options_changes_nothing() -> None:
    """``curvature`` gives what a fit with those options would, the object unchanged:
    every tensor's exact diagonal, or exact blocks, against the dense GGN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 2, (12,))
    la = EKFACLaplace(model, "classification")
    la.fit(loader(X, y))
    before = [v.clone() for v in la.H.eigenvalues]
    params = la.posterior_parameters
    ggn = dense_ggn(model, params, X, "classification")
    diagonal = la.curvature(loader(X, y), diagonal_blocks=True)
    assert all(not basis for basis in diagonal.eigenvectors)
    assert_close(torch.cat([v.flatten() for v in diagonal.eigenvalues]), ggn.diagonal())
    exact = la.curvature(loader(X, y), dense_blocks_up_to=100).to_decomposed()
    sizes = [p.numel() for p in params]
    assert_close(exact.to_matrix(), torch.block_diag(*blocks(ggn, sizes)))
    assert all(torch.equal(a, b) for a, b in zip(before, la.H.eigenvalues))
    with pytest.raises(ValueError, match="Unknown EKFAC option"):
        la.curvature(loader(X, y), dense_blocks=3)


def test_a_channels_last_network_fits_predicts_samples_and_keeps_its_format():
    """Non-contiguous parameters: the same posterior as the contiguous network,
    every predictive, and the weights still ``channels_last`` afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=2),
        nn.Flatten(),
        nn.Linear(64, 3),
    ).double()
    X = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    plain = EKFACLaplace(copy.deepcopy(model), "classification")
    plain.fit(loader(X, y))
    last = model.to(memory_format=torch.channels_last)
    assert not last[0].weight.is_contiguous()
    for subset in ("all", "last_layer"):
        la = Laplace(last, "classification", subset, "ekfac")
        la.fit(loader(X, y))
        if subset == "all":
            assert_close(la.mean, plain.mean)
            assert_close(
                la.posterior_precision.to_matrix(),
                plain.posterior_precision.to_matrix(),
            )
        assert la(X[:2], pred_type="glm").shape == (2, 3)
        nn_probs = la(X[:2], pred_type="nn", link_approx="mc", n_samples=3)
        assert nn_probs.shape == (2, 3)
        assert la.sample(3).shape == (3, la.n_params)
        la.optimize_prior_precision(method="marglik", n_steps=2)
        la.load_state_dict(la.state_dict())
    assert last[0].weight.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------- low-rank correction
def _low_rank_laplace(subset: str = "all", **options) -> tuple:
    case = CASES[4]  # a CNN: shared weights
    model, X, y = case.make()
    cls = EKFACLaplace if subset == "all" else EKFACLLLaplace
    la = cls(
        model,
        case.likelihood,
        prior_precision=0.7,
        correction_rank=3,
        dense_blocks_up_to=10,
        **options,
    )
    la.fit(loader(X, y))
    return la, model, X, y


@pytest.mark.parametrize("subset", SUBSETS)
def test_low_rank_posterior_is_exact_against_its_dense_precision(subset):
    la, model, X, y = _low_rank_laplace(subset)
    assert any(c is not None for c in la.H.corrections)
    P = la.posterior_precision.to_matrix()
    covariance = torch.linalg.inv(P)
    assert_close(la.log_det_posterior_precision, torch.logdet(P))
    assert_close(la.posterior_variance, covariance.diagonal())
    assert_close(la.posterior_covariance, covariance)
    params = list(model.parameters()) if subset == "all" else last_layer_params(model)
    J, _ = jacobians(model, params, X[:4])
    for joint in (False, True):
        _, variance = la._jacobian_free_predictive(X[:4], joint=joint)
        if joint:
            expected = torch.einsum("nci,ij,mdj->ncmd", J, covariance, J)
            expected = expected.reshape(12, 12)
        else:
            expected = torch.einsum("nci,ij,ndj->ncd", J, covariance, J)
        assert_close(variance, expected)


def test_low_rank_evidence_and_its_gradient_in_the_prior_are_exact():
    la, *_ = _low_rank_laplace()
    H = la.H.to_matrix()
    log_prior = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    la.prior_precision = log_prior.exp()
    logdet = la.log_det_posterior_precision
    (ours,) = torch.autograd.grad(logdet, log_prior)
    prior = log_prior.detach().clone().requires_grad_(True)
    dense = torch.logdet(H + prior.exp() * torch.eye(len(H), dtype=H.dtype))
    (theirs,) = torch.autograd.grad(dense, prior)
    assert_close(logdet.detach(), dense.detach())
    assert_close(ours, theirs)


def test_low_rank_online_fit_merges_the_two_fits_corrections():
    case = CASES[4]
    model, X, y = case.make()
    la = EKFACLaplace(model, case.likelihood, correction_rank=2)
    la.fit(loader(X[:12], y[:12]))
    first = {i: c for i, c in enumerate(la.H.corrections) if c is not None}
    diagonals = dict(la.correction_diagonals)
    params = list(model.parameters())
    second = ekfac_laplace.compute_ekfac(
        model,
        params,
        ekfac_laplace.batches.LaplaceBatches(loader(X[12:], y[12:])),
        case.likelihood,
        12,
        la.options,
        eigenbasis=la.H.eigenvectors,
        fitted=la.fitted_layout,
    )
    la.fit(loader(X[12:], y[12:]), override=False)
    expected = ekfac_laplace.sketch.corrected_matrix(
        la.H.eigenvectors,
        [diagonals[i] + second.eigenvalues[i] for i in range(len(params))],
        {
            i: ekfac_laplace.sketch.merged_eigenpairs(
                first[i], second.corrections[i], 2
            )
            for i in first
        },
    )
    assert_close(la.H.to_matrix(), expected.to_matrix())


def test_low_rank_state_round_trips_and_a_broken_one_is_refused():
    la, model, X, y = _low_rank_laplace()
    state = la.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    other = EKFACLaplace(model, "classification", prior_precision=0.7)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert_close(
        other.posterior_precision.to_matrix(), la.posterior_precision.to_matrix()
    )
    assert other.options.correction_rank == 3
    missing = {k: v for k, v in state.items() if k != "ekfac_corrections"}
    with pytest.raises(ValueError, match="its fitted layout corrects blocks"):
        other.load_state_dict(missing)
    (index, U, S), *rest = state["ekfac_corrections"]
    wrong = {**state, "ekfac_corrections": [(index, U[:-1], S), *rest]}
    with pytest.raises(ValueError, match="needs U"):
        other.load_state_dict(wrong)
    fewer = {**state, "ekfac_corrections": [(index, U[:, :-1], S[:-1]), *rest]}
    with pytest.raises(ValueError, match="keeps 3 pairs"):
        other.load_state_dict(fewer)
    skewed = {**state, "ekfac_corrections": [(index, U * 2, S), *rest]}
    with pytest.raises(ValueError, match="not orthonormal"):
        other.load_state_dict(skewed)
    negative = {**state, "ekfac_corrections": [(index, U, -S - 1), *rest]}
    with pytest.raises(ValueError, match="go down to"):
        other.load_state_dict(negative)
    without_rank = {
        **state,
        "ekfac_options": [
            (name, 0 if name == "correction_rank" else value)
            for name, value in state["ekfac_options"]
        ],
    }
    with pytest.raises(ValueError, match=r"\(correction_rank=0\)"):
        other.load_state_dict(without_rank)
    # A correction on an exact block (a layout marked so) is refused too.
    version, blocks, dims = state["ekfac_layout"]
    exact = next(i for i, block in enumerate(blocks) if block[3] == "exact")
    blocks = [list(block) for block in blocks]
    blocks[exact][6] = 1
    n = state["H"][exact][0].numel()
    on_exact = {
        **state,
        "ekfac_layout": [version, blocks, dims],
        "ekfac_corrections": [
            *state["ekfac_corrections"],
            (exact, torch.eye(n, 1, dtype=torch.float64), S[:1]),
        ],
    }
    with pytest.raises(ValueError, match="structure 'exact', not a Kronecker one"):
        other.load_state_dict(on_exact)
    assert_close(
        other.posterior_precision.to_matrix(), la.posterior_precision.to_matrix()
    )


def test_low_rank_options_are_checked():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="correction_rank=2 needs engine='fast'"):
        EKFACLaplace(model, "classification", correction_rank=2, engine="curvlinops")
    with pytest.raises(ValueError, match="correction_rank"):
        EKFACLaplace(model, "classification", correction_rank=-1)
    with pytest.raises(ValueError, match="correction_examples"):
        EKFACLaplace(model, "classification", correction_examples=0)


def test_low_rank_samples_have_the_posterior_covariance():
    la, *_ = _low_rank_laplace()
    covariance = torch.linalg.inv(la.posterior_precision.to_matrix())
    generator = torch.Generator().manual_seed(0)
    samples = la.sample(40_000, generator=generator)
    deviations = samples - la.mean
    # Whitened by the dense covariance, the samples are standard normal: each
    # entry of their covariance within 6 standard errors (1/√n) of the identity.
    root = torch.linalg.cholesky(covariance)
    white = torch.linalg.solve_triangular(root, deviations.mT, upper=False).mT
    empirical = white.mT @ white / len(samples)
    identity = torch.eye(len(covariance), dtype=covariance.dtype)
    assert float((empirical - identity).abs().max()) < 6 / len(samples) ** 0.5
    assert float(white.mean(0).abs().max()) < 6 / len(samples) ** 0.5
