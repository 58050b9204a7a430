"""Data-parallel fits with torch.distributed (gloo, 2 and 3 processes on the CPU).

Each world size is one spawn: the ranks run every scenario in turn and save what they
got; the tests here compare it with the single-process fit of the union of the shards
(computed in this process, float64) and check the failures.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from laplace import Laplace
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

import ekfac_laplace  # noqa: F401
from ekfac_laplace.distributed import DistributedFitError, LocalRanks
from ekfac_laplace.evaluation import evaluate

N_DATA = 13  # shards of unequal size for 2 and 3 ranks


# ------------------------------------------------------------------ problems
def _mlp(hidden: int = 5, n_out: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, n_out))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 3),
    )


class _Masked(nn.Linear):
    """A layer that fails the layer check: its exact diagonal block on every rank."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(self.weight).triu()
        return nn.functional.linear(x, mask * self.weight, self.bias)


def _data(kind: str, seed: int = 0) -> tuple[nn.Module, TensorDataset]:
    """A float64 model (eval mode, non-trivial batch-norm statistics) and its data."""
    torch.manual_seed(seed)
    if kind == "convs":  # a convolution and a transposed one (a bias of its own),
        model = nn.Sequential(  # grouped: a basis per group
            nn.Conv1d(2, 4, 3, padding=1, padding_mode="reflect", groups=2),
            nn.Tanh(),
            nn.ConvTranspose1d(4, 2, 2, stride=2, groups=2),
            nn.Flatten(),
            nn.Linear(2 * 8, 3),
        ).double()
        X = torch.randn(N_DATA, 2, 4, dtype=torch.float64)
    elif kind == "masked":
        model = _mlp().double()
        model[0] = _Masked(4, 5).double()
        X = torch.randn(N_DATA, 4, dtype=torch.float64)
    elif kind == "cnn":
        model = _cnn().double().eval()
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        X = torch.randn(N_DATA, 1, 6, 6, dtype=torch.float64)
    else:
        model = _mlp().double()
        X = torch.randn(N_DATA, 4, dtype=torch.float64)
    if kind == "regression":
        y = torch.randn(N_DATA, 3, dtype=torch.float64)
    else:
        y = torch.randint(0, 3, (N_DATA,))
    return model, TensorDataset(X, y)


#: name → (data kind, likelihood, subset, Laplace keywords)
CONFIGS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "mlp-classification-all": ("mlp", "classification", "all", {}),
    "mlp-regression-ll-ef-nocache": (
        "regression",
        "regression",
        "last_layer",
        {"backend_name": "ef", "cache_budget_bytes": 0, "sigma_noise": 0.7},
    ),
    "mlp-regression-all": ("regression", "regression", "all", {"sigma_noise": 0.5}),
    "mlp-classification-ll": ("mlp", "classification", "last_layer", {}),
    "masked-classification-all": ("masked", "classification", "all", {}),
    "cnn-classification-all-dense": (  # exact blocks of the small tensors
        "cnn",
        "classification",
        "all",
        {"dense_blocks_up_to": 40},
    ),
    "convs-classification-all-nocache": (  # expand: reduce's G has a null space
        "convs",
        "classification",
        "all",
        {"cache_budget_bytes": 0},
    ),
    "cnn-classification-all-reduce": (
        "cnn",
        "classification",
        "all",
        {"kfac_approx": "reduce", "prior_precision": 0.5},
    ),
    "cnn-classification-all-nocache": (
        "cnn",
        "classification",
        "all",
        {"cache_budget_bytes": 0},
    ),
    "cnn-classification-all-lowrank": (  # the sketches summed, then a power pass
        "cnn",
        "classification",
        "all",
        {"correction_rank": 2, "cache_budget_bytes": 0},
    ),
}


def _laplace(config: str, group: Any | None = None, model: nn.Module | None = None):
    kind, likelihood, subset, kwargs = CONFIGS[config]
    kwargs = dict(kwargs)
    if kwargs.pop("backend_name", None) == "ef":
        from laplace.curvature import CurvlinopsEF

        kwargs["backend"] = CurvlinopsEF
    default_model, data = _data(kind)
    la = Laplace(
        default_model if model is None else model,
        likelihood,
        subset_of_weights=subset,
        hessian_structure="ekfac",
        process_group=group,
        **kwargs,
    )
    return la, data


def _shard(data: TensorDataset, rank: int, world: int) -> Subset:
    return Subset(data, list(range(rank, len(data), world)))


def _summary(la, data: TensorDataset) -> dict[str, Any]:
    X = data.tensors[0][:4]
    _, f_var = la._glm_predictive_distribution(X)
    return {
        "precision": la.posterior_precision.to_matrix(),
        "eigenvectors": [tuple(q.clone() for q in b) for b in la.H.eigenvectors],
        "eigenvalues": [v.clone() for v in la.H.eigenvalues],
        "log_det": la.log_det_posterior_precision.detach(),
        "log_marglik": la.log_marginal_likelihood().detach(),
        "f_var": f_var,
        "loss": torch.as_tensor(la.loss).detach(),
        "n_data": la.n_data,
    }


# ----------------------------------------------------------- what ranks do
def _fit_scenarios(rank: int, world: int, group: Any) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for config in CONFIGS:
        la, data = _laplace(config, group)
        la.fit(DataLoader(_shard(data, rank, world), batch_size=3))
        results[config] = _summary(la, data)
    # Online fitting: the first half, then the second, each sharded.
    la, data = _laplace("mlp-classification-all", group)
    first, second = Subset(data, range(7)), Subset(data, range(7, N_DATA))
    la.fit(DataLoader(_shard(first, rank, world), batch_size=2))
    la.fit(DataLoader(_shard(second, rank, world), batch_size=2), override=False)
    results["online"] = _summary(la, data)
    # The MC Fisher: reproducible for a seed and world size.
    mc = []
    for _ in range(2):
        model, data = _data("mlp")
        la = Laplace(
            model,
            "classification",
            subset_of_weights="all",
            hessian_structure="ekfac",
            backend_kwargs={"stochastic": True},
            mc_samples=300,
            seed=3,
            process_group=group,
        )
        la.fit(DataLoader(_shard(data, rank, world), batch_size=3))
        mc.append([v.clone() for v in la.H.eigenvalues])
    results["mc"] = mc
    # The state of a distributed fit, for a single-process load.
    la, data = _laplace("mlp-classification-all", group)
    la.fit(DataLoader(_shard(data, rank, world), batch_size=3))
    if rank == 0:
        results["state"] = la.state_dict()
    # Distributed evaluation of the whole test set.
    results["evaluate"] = evaluate(
        la, DataLoader(_shard(data, rank, world), batch_size=4), process_group=group
    )
    return results


def _failure_scenarios(rank: int, world: int, group: Any) -> dict[str, Any]:
    results: dict[str, Any] = {}

    def attempt(name: str, la, loader) -> None:
        start = time.perf_counter()
        try:
            la.fit(loader)
            results[name] = ("ok", "", la.H is None)
        except BaseException as error:  # noqa: BLE001 - recorded for the test
            results[name] = (type(error).__name__, str(error), la.H is None)
        results[f"{name}_seconds"] = time.perf_counter() - start

    # A rank with an empty shard.
    la, data = _laplace("mlp-classification-all", group)
    shard = Subset(data, []) if rank == world - 1 else _shard(data, rank, world)
    attempt("empty", la, DataLoader(shard, batch_size=3))
    # Ranks that disagree on the model.
    model = _mlp(hidden=6 if rank == world - 1 else 5).double()
    la, data = _laplace("mlp-classification-all", group, model=model)
    attempt("disagree", la, DataLoader(_shard(data, rank, world), batch_size=3))
    # A rank whose pass raises on its second batch.
    la, data = _laplace("mlp-classification-all", group)
    calls = {"n": 0}

    def fail_late(module, args):
        calls["n"] += 1
        if rank == world - 1 and calls["n"] == 3:  # output_size, batch 1, batch 2
            raise RuntimeError("disk read failed")

    handle = la.model[0].register_forward_pre_hook(fail_late)
    attempt("raises", la, DataLoader(_shard(data, rank, world), batch_size=2))
    handle.remove()
    # A rank interrupted (Ctrl-C) in its pass that stays alive.
    la, data = _laplace("mlp-classification-all", group)
    calls["n"] = 0

    def interrupted(module, args):
        calls["n"] += 1
        if rank == world - 1 and calls["n"] == 5:
            raise KeyboardInterrupt

    handle = la.model[0].register_forward_pre_hook(interrupted)
    attempt("interrupt", la, DataLoader(_shard(data, rank, world), batch_size=2))
    handle.remove()
    # A rank whose model has two entries swapped (same shapes, same sum).
    model = _data("mlp")[0]
    if rank == world - 1:
        with torch.no_grad():
            first, second = model[0].weight[0, 0].item(), model[0].weight[0, 1].item()
            model[0].weight[0, 0], model[0].weight[0, 1] = second, first
    la, data = _laplace("mlp-classification-all", group, model=model)
    attempt("swapped", la, DataLoader(_shard(data, rank, world), batch_size=3))
    # Ranks with different priors.
    la, data = _laplace("mlp-classification-all", group)
    la.prior_precision = 2.0 if rank == world - 1 else 1.0
    attempt("priors", la, DataLoader(_shard(data, rank, world), batch_size=3))
    # Without the opt-in, a DistributedSampler shard is fitted with a warning.
    la, data = _laplace("mlp-classification-all", None)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        la.fit(DataLoader(data, batch_size=3, sampler=sampler))
    results["warning"] = [str(w.message) for w in caught]
    # A grid search over different validation shards picks different priors.
    la, data = _laplace("mlp-classification-all", group)
    la.fit(DataLoader(_shard(data, rank, world), batch_size=3))
    prior = la.prior_precision.clone()
    X_val = data.tensors[0][:4]
    with torch.no_grad():  # agreeing labels want a confident posterior, others not
        logits = la.model(X_val)
    y_val = logits.argmax(-1) if rank == 0 else logits.argmin(-1)
    try:
        la.optimize_prior_precision(
            method="gridsearch",
            val_loader=DataLoader(TensorDataset(X_val, y_val), batch_size=4),
            # A callable sees this rank's loader only (torchmetrics' default losses
            # sync over the default group by themselves).
            loss=lambda probs, y: -probs[torch.arange(len(y)), y].log().mean(),
            grid_size=20,
            link_approx="probit",
        )
        results["gridsearch"] = ("ok", str(la.prior_precision.tolist()), True)
    except ValueError as error:
        results["gridsearch"] = (
            "ValueError",
            str(error),
            torch.equal(la.prior_precision, prior),
        )
    # A rank that never arrives: bounded by the group's (short) timeout.
    short = dist.new_group(timeout=datetime.timedelta(seconds=3))
    la, data = _laplace("mlp-classification-all", short)
    if rank == world - 1:
        time.sleep(6)
        results["timeout"] = ("absent", "", True)
    else:
        start = time.perf_counter()
        attempt("timeout", la, DataLoader(_shard(data, rank, world), batch_size=3))
        results["timeout_seconds"] = time.perf_counter() - start
    return results


def _worker(rank: int, world: int, folder: str, kind: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{folder}/rendezvous-{kind}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        scenarios = _fit_scenarios if kind == "fit" else _failure_scenarios
        results = scenarios(rank, world, dist.group.WORLD)
    except Exception:  # noqa: BLE001 - the test shows the traceback
        results = {"traceback": traceback.format_exc()}
    torch.save(results, f"{folder}/{kind}-rank{rank}.pt")
    if kind == "fit":
        dist.barrier()  # no rank tears down while another still reads
        dist.destroy_process_group()
    else:  # a group that timed out can abort in gloo's destructors at exit
        os._exit(0)


def _spawn(tmp_path: Path, world: int, kind: str) -> list[dict[str, Any]]:
    mp.spawn(_worker, args=(world, str(tmp_path), kind), nprocs=world, join=True)
    results = [
        torch.load(tmp_path / f"{kind}-rank{r}.pt", weights_only=False)
        for r in range(world)
    ]
    for result in results:
        assert "traceback" not in result, result.get("traceback")
    return results


# ------------------------------------------------------------------- checks
def _assert_close(actual, expected, rtol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol)


def _flat(blocks: list) -> list[torch.Tensor]:
    """Eigenvalue tensors, or the tensors of eigenvector tuples, in one list."""
    return [t for b in blocks for t in (b if isinstance(b, tuple) else (b,))]


def _single_process(config: str) -> dict[str, Any]:
    la, data = _laplace(config)
    with warnings.catch_warnings():  # the masked layer's diagonal block
        warnings.filterwarnings("ignore", message=".*exact diagonal block instead")
        la.fit(DataLoader(data, batch_size=3))
    return _summary(la, data)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"{w}-ranks")
def fitted(request, tmp_path_factory) -> tuple[int, list[dict[str, Any]]]:
    world = request.param
    return world, _spawn(tmp_path_factory.mktemp(f"fit{world}"), world, "fit")


def test_every_rank_holds_the_single_process_posterior_of_the_union(fitted):
    world, results = fitted
    for config in CONFIGS:
        expected = _single_process(config)
        for rank in range(world):
            got = results[rank][config]
            assert got["n_data"] == N_DATA
            if config.startswith("masked"):  # failed the layer check on each rank
                assert [len(b) for b in got["eigenvectors"]] == [0, 0, 2, 1]
            for key in ("precision", "log_det", "log_marglik", "f_var", "loss"):
                _assert_close(got[key], expected[key])
            # The eigenbasis is only defined up to rotations within degenerate
            # eigenspaces (e.g. the null space of a rank-deficient factor); the
            # precision above is what it defines. Across ranks: bit for bit.
            for key in ("eigenvectors", "eigenvalues"):
                flat = [
                    t for b in got[key] for t in (b if key == "eigenvectors" else [b])
                ]
                first = results[0][config][key]
                first = [
                    t for b in first for t in (b if key == "eigenvectors" else [b])
                ]
                assert all(torch.equal(a, b) for a, b in zip(flat, first)), key
            assert torch.equal(got["precision"], results[0][config]["precision"])


def test_online_fitting_is_the_single_process_online_fit(fitted):
    world, results = fitted
    la, data = _laplace("mlp-classification-all")
    la.fit(DataLoader(Subset(data, range(7)), batch_size=2))
    la.fit(DataLoader(Subset(data, range(7, N_DATA)), batch_size=2), override=False)
    expected = _summary(la, data)
    for rank in range(world):
        _assert_close(results[rank]["online"]["precision"], expected["precision"])
        assert results[rank]["online"]["n_data"] == N_DATA


def test_the_mc_fisher_is_reproducible_and_unbiased(fitted):
    world, results = fitted
    for rank in range(world):
        first, second = results[rank]["mc"]
        assert all(torch.equal(a, b) for a, b in zip(first, second))
    # Σλ of a block is Σ_n ‖J_nᵀ v_n‖², whose expectation is the exact GGN's trace.
    exact = _single_process("mlp-classification-all")["eigenvalues"]
    for mc, ggn in zip(results[0]["mc"][0], exact):
        assert abs(mc.sum() / ggn.sum() - 1) < 0.1


def test_a_distributed_fit_loads_in_one_process(fitted):
    world, results = fitted
    la, data = _laplace("mlp-classification-all")
    la.load_state_dict(results[0]["state"])
    expected = _single_process("mlp-classification-all")
    _assert_close(la.posterior_precision.to_matrix(), expected["precision"])


def test_distributed_evaluation_gives_the_whole_test_sets_metrics(fitted):
    world, results = fitted
    la, data = _laplace("mlp-classification-all")
    la.fit(DataLoader(data, batch_size=3))
    expected = evaluate(la, DataLoader(data, batch_size=4))
    for rank in range(world):
        got = results[rank]["evaluate"]
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_failures_stop_every_rank_without_a_hang(tmp_path):
    world = 2
    start = time.perf_counter()
    results = _spawn(tmp_path, world, "failures")
    assert time.perf_counter() - start < 60
    empty, other = results[world - 1]["empty"], results[0]["empty"]
    assert empty[0] == "ValueError" and "empty" in empty[1]
    assert other[0] == "DistributedFitError" and f"Rank {world - 1}" in other[1]
    for rank in range(world):
        name, message, unchanged = results[rank]["disagree"]
        assert name == "ValueError" and "disagree" in message and unchanged
        assert results[rank]["empty"][2] and results[rank]["raises"][2]
    assert results[world - 1]["raises"][:2] == ("RuntimeError", "disk read failed")
    assert results[0]["raises"][0] == "DistributedFitError"
    assert "disk read failed" in results[0]["raises"][1]
    # An interrupted rank stops the others at once (the group's timeout is 60 s).
    assert results[world - 1]["interrupt"][0] == "KeyboardInterrupt"
    name, message, unchanged = results[0]["interrupt"]
    assert name == "DistributedFitError" and "KeyboardInterrupt" in message
    assert unchanged and results[0]["interrupt_seconds"] < 20
    for rank in range(world):  # bit-exact parameters, and the same priors
        name, message, unchanged = results[rank]["swapped"]
        assert name == "ValueError" and "SHA-256" in message and unchanged
        name, message, unchanged = results[rank]["priors"]
        assert name == "ValueError" and "prior precision" in message and unchanged
    for rank in range(world):
        assert any("process_group" in w for w in results[rank]["warning"])
        name, message, unchanged = results[rank]["gridsearch"]
        assert name == "ValueError" and "same (whole)" in message and unchanged
    name, message, unchanged = results[0]["timeout"]
    assert name == "DistributedFitError" and "timeout" in message and unchanged
    assert results[0]["timeout_seconds"] < 30


def test_one_process_exchanges_nothing():
    ranks = LocalRanks()
    tensor = torch.ones(3)
    ranks.sum_([tensor])
    assert torch.equal(tensor, torch.ones(3)) and ranks.total(5) == 5
    assert ranks.gather([1, 2]) == [1, 2]
    assert ranks.share_out(2, lambda i: [torch.tensor(float(i))])[1][0] == 1.0
    with pytest.raises(KeyError):
        ranks.agree(KeyError("mine"), "work")
    with pytest.raises(ValueError, match="not initialised"):
        Laplace(
            _mlp(),
            "classification",
            subset_of_weights="all",
            hessian_structure="ekfac",
            process_group=object(),
        ).fit(DataLoader(TensorDataset(torch.randn(4, 4), torch.zeros(4).long())))


def test_distributed_fit_error_is_a_runtime_error():
    assert issubclass(DistributedFitError, RuntimeError)
