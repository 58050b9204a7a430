"""Continual learning with online EKFAC Laplace: ``fit(override=False)`` on digits.

Splits scikit-learn's bundled digits into two tasks, A (classes 0-4) and B
(classes 5-9), and trains one MLP with a shared 10-way output layer:

1. Train the MAP ``θ_A`` on task A and fit an all-weights EKFAC Laplace
   approximation on A (prior precision tuned by marginal likelihood).
2. Check the online update numerically at ``θ_A``: fitting A twice with
   ``override=False`` doubles the corrected eigenvalues, and fitting A then B keeps
   A's eigenbasis ``Q`` and gives ``λ = diag(Qᵀ (GGN_A + GGN_B) Q)``, which is
   compared with a dense reference built here from per-example Jacobians
   (``torch.func``) and ``Λ_n = diag(p_n) - p_n p_nᵀ``.
3. Train on task B only, starting from ``θ_A``, (a) by plain fine-tuning and
   (b) with the Laplace penalty of task A (online Laplace, Ritter et al., 2018;
   EWC-style, Kirkpatrick et al., 2017), minimising
   ``mean CE_B(θ) + s · ½ (θ - θ_A)ᵀ P_A (θ - θ_A) / N_B`` where
   ``P_A = la.posterior_precision`` (GGN of A plus prior, applied with
   ``EKFACDecomposed.bmm``) and ``s`` is a penalty strength (``s = 1`` is the
   Bayesian online update; larger ``s`` tempers it).
4. Update the posterior online with ``la.fit(loader_B, override=False)`` at the
   penalised ``θ_B`` and evaluate its GLM predictive on both tasks.

It prints the test accuracy on A and B after each stage: 10-way (class-incremental:
the hardest setting, where the network must also not predict B's classes for A's
images) and within-task (the argmax over the task's own five classes). Figure:
``continual.png`` (accuracies per epoch of training on B, and the online
eigenvalues against the dense reference).

Run: ``python examples/example_continual.py [--out DIR]`` (about 7 seconds on
2 CPU cores; figures go to ``example-output/continual/`` in the current folder).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from pathlib import Path

# First: registers hessian_structure="ekfac", and hides the deprecation notice that
# laplace-torch's import of asdl triggers in torch (not actionable here).
import ekfac_laplace  # noqa: F401

# isort: split
import torch
from laplace import Laplace
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader, TensorDataset

from ekfac_laplace import EKFACDecomposed  # registers "ekfac"
from ekfac_laplace.evaluation import (
    ClassificationPredictions,
    classification_metrics,
    data,
    plotting,
)
from ekfac_laplace.evaluation.models import mlp, train_map

# laplace-torch reminds on every prior tuning that the default link is probit, even
# when link_approx is passed; we pass it.
warnings.filterwarnings("ignore", message="By default `link_approx` is `probit`")

TASKS = {"A": tuple(range(5)), "B": tuple(range(5, 10))}


def task_subset(
    dataset: TensorDataset, classes: tuple[int, ...], n: int | None
) -> TensorDataset:
    """The examples of ``dataset`` whose label is in ``classes`` (the first ``n``)."""
    inputs, targets = dataset.tensors
    keep = torch.isin(targets, torch.tensor(classes))
    return TensorDataset(inputs[keep][:n], targets[keep][:n])


def accuracies(model: nn.Module, tests: dict[str, TensorDataset]) -> dict[str, float]:
    """10-way and within-task test accuracy on each task."""
    result = {}
    with torch.no_grad():
        for name, test in tests.items():
            inputs, targets = test.tensors
            logits = model(inputs)
            result[f"{name} 10-way"] = (logits.argmax(-1) == targets).float().mean()
            own = torch.tensor(TASKS[name])
            within = own[logits[:, own].argmax(-1)]
            result[f"{name} within"] = (within == targets).float().mean()
    return {key: value.item() for key, value in result.items()}


def train_on_b(
    model: nn.Module,
    loader: DataLoader,
    tests: dict[str, TensorDataset],
    *,
    epochs: int,
    lr: float,
    seed: int,
    penalty: tuple[Tensor, EKFACDecomposed, float] | None = None,
) -> list[dict[str, float]]:
    """Adam on task B, optionally with the Laplace penalty; accuracies per epoch.

    ``penalty = (θ_A, P_A, strength)`` adds ``strength · ½ dᵀ P_A d / N_B`` with
    ``d = θ - θ_A``; without it, weight decay 1e-4 (the MAP's prior) is used.
    """
    torch.manual_seed(seed)
    weight_decay = 1e-4 if penalty is None else 0.0
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    n_data = len(loader.dataset)
    history = [accuracies(model, tests)]
    for _ in range(epochs):
        model.train()
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs), targets)
            if penalty is not None:
                mean, precision, strength = penalty
                delta = parameters_to_vector(model.parameters()) - mean
                quadratic = delta @ precision.bmm(delta, exponent=1)
                loss = loss + strength * 0.5 * quadratic / n_data
            loss.backward()
            optimizer.step()
        model.eval()
        history.append(accuracies(model, tests))
    return history


def dense_eigenvalues(
    model: nn.Module,
    eigenvectors: list[tuple[Tensor, ...]],
    datasets: list[TensorDataset],
) -> list[Tensor]:
    """Reference ``diag(Qᵀ GGN Q)`` per parameter tensor, from dense Jacobians.

    ``GGN = Σ_n J_nᵀ Λ_n J_n`` (summed over all datasets) with the per-example
    Jacobian ``J_n`` of the logits and ``Λ_n = diag(p_n) - p_n p_nᵀ``; a weight
    block's coordinates in the basis ``Q_G ⊗ Q_A`` are ``Q_Gᵀ J Q_A``, a bias's
    ``Q_Gᵀ j``. Computed in float64.
    """
    reference = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in reference.named_parameters()}

    def logits(p: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(reference, p, (x.unsqueeze(0),)).squeeze(0)

    jacobian = vmap(jacrev(logits), in_dims=(None, 0))
    totals = [
        torch.zeros(*(q.shape[0] for q in basis), dtype=torch.float64)
        for basis in eigenvectors
    ]
    for dataset in datasets:
        for inputs, _ in DataLoader(dataset, batch_size=128):
            inputs = inputs.double()
            with torch.no_grad():
                probs = reference(inputs).softmax(-1)
            hessian = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
            jacobians = jacobian(params, inputs)
            for index, (block, basis) in enumerate(
                zip(jacobians.values(), eigenvectors)
            ):
                q_g = basis[0].double()
                if len(basis) == 2:
                    rotated = q_g.T @ block @ basis[1].double()
                    totals[index] += torch.einsum(
                        "nkl,nkoi,nloi->oi", hessian, rotated, rotated
                    )
                else:
                    rotated = block @ q_g
                    totals[index] += torch.einsum(
                        "nkl,nko,nlo->o", hessian, rotated, rotated
                    )
    return totals


def max_relative_error(values: list[Tensor], reference: list[Tensor]) -> float:
    """Largest ``|a - b| / max|b|`` over the blocks."""
    return max(
        ((a.double() - b).abs().max() / b.abs().max()).item()
        for a, b in zip(values, reference)
    )


def glm_metrics(la: Laplace, test: TensorDataset) -> dict[str, float]:
    inputs, targets = test.tensors
    probs = la(inputs, pred_type="glm", link_approx="probit")
    return classification_metrics(ClassificationPredictions(probs, targets))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--n-train", type=int, default=None, help="training images per task"
    )
    parser.add_argument("--hidden", type=int, default=32, help="width of 2 layers")
    parser.add_argument("--epochs", type=int, default=50, help="per task")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--strengths",
        type=float,
        nargs="+",
        default=[1.0, 10.0],
        help="Laplace penalty strengths s (1 is the Bayesian online update)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path("example-output") / "continual"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()

    splits = data.load_digits_splits(seed=args.seed)
    train = {k: task_subset(splits.train, c, args.n_train) for k, c in TASKS.items()}
    tests = {k: task_subset(splits.test, c, None) for k, c in TASKS.items()}
    print(
        f"{splits.description}\ntask A = classes 0-4 ({len(train['A'])} train / "
        f"{len(tests['A'])} test), task B = classes 5-9 ({len(train['B'])} train / "
        f"{len(tests['B'])} test)"
    )
    fit_loaders = {k: DataLoader(d, batch_size=256) for k, d in train.items()}

    # 1. MAP on A and its Laplace approximation.
    torch.manual_seed(args.seed)
    model = mlp(splits.input_shape, splits.n_outputs, hidden=(args.hidden,) * 2)
    train_map(
        model,
        DataLoader(train["A"], batch_size=64, shuffle=True),
        "classification",
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
    )
    la = Laplace(
        model, "classification", subset_of_weights="all", hessian_structure="ekfac"
    )
    la.fit(fit_loaders["A"])
    la.optimize_prior_precision(method="marglik", link_approx="probit")
    print(
        f"EKFAC Laplace on A: {la.n_params:,} parameters, prior precision "
        f"{la.prior_precision.item():.3g}"
    )

    # 2. The online update, checked at θ_A.
    check = Laplace(
        model, "classification", subset_of_weights="all", hessian_structure="ekfac"
    )
    check.fit(fit_loaders["A"])
    eigenvalues_a = [values.clone() for values in check.H.eigenvalues]
    basis_a = check.H.eigenvectors
    check.fit(fit_loaders["A"], override=False)
    doubled = max_relative_error(
        check.H.eigenvalues, [2 * values.double() for values in eigenvalues_a]
    )
    check.fit(fit_loaders["A"])
    check.fit(fit_loaders["B"], override=False)
    online = check.H.eigenvalues
    basis_kept = all(
        torch.equal(q_new, q_old)
        for new, old in zip(check.H.eigenvectors, basis_a)
        for q_new, q_old in zip(new, old)
    )
    reference = dense_eigenvalues(model, check.H.eigenvectors, [train["A"], train["B"]])
    online_error = max_relative_error(online, reference)
    print(
        f"\nOnline fit at θ_A (max |error| / max|λ| over {len(online)} blocks):\n"
        f"  A, then A with override=False, vs 2·λ_A: {doubled:.2e}\n"
        f"  A, then B with override=False, vs dense diag(Qᵀ(GGN_A+GGN_B)Q): "
        f"{online_error:.2e} (A's eigenbasis kept: {basis_kept})"
    )

    # 3. Sequential training on B: plain fine-tuning vs the Laplace penalty of A.
    b_loader = DataLoader(train["B"], batch_size=64, shuffle=True)
    options = {"epochs": args.epochs, "lr": args.lr, "seed": args.seed + 1}
    histories = {
        "fine-tune": train_on_b(copy.deepcopy(model), b_loader, tests, **options)
    }
    precision = la.posterior_precision
    penalised = {}
    for strength in args.strengths:
        name = f"Laplace s={strength:g}"
        penalised[name] = copy.deepcopy(model)
        histories[name] = train_on_b(
            penalised[name],
            b_loader,
            tests,
            penalty=(la.mean, precision, strength),
            **options,
        )
    after_a = histories["fine-tune"][0]
    columns = list(after_a)
    print(f"\nTest accuracy\n{'stage':<26}" + "".join(f"{c:>12}" for c in columns))
    print(
        f"{'after A (MAP θ_A)':<26}" + "".join(f"{after_a[c]:>12.3f}" for c in columns)
    )
    for name, history in histories.items():
        row = "".join(f"{history[-1][c]:>12.3f}" for c in columns)
        print(f"{'after B, ' + name:<26}{row}")

    # 4. Online posterior over both tasks, around the first penalised θ_B.
    first = next(iter(penalised))
    model.load_state_dict(penalised[first].state_dict())
    la.fit(fit_loaders["B"], override=False)
    print(
        f"\nOnline EKFAC posterior after A then B (mean = θ_B of {first}, "
        f"n_data {la.n_data}): GLM probit predictive"
    )
    for name, test in tests.items():
        metrics = glm_metrics(la, test)
        print(
            f"  task {name}: accuracy {metrics['accuracy']:.3f}  nll "
            f"{metrics['nll']:.3f}  ece {metrics['ece']:.3f}"
        )

    figure, axes = plotting.new_figure(4, ncols=2, size=(4.4, 3.4))
    panels = {
        "A 10-way": "task A, 10-way accuracy",
        "A within": "task A, within-task accuracy",
        "B 10-way": "task B, 10-way accuracy",
    }
    for ax, (column, title) in zip(axes, panels.items()):
        for name, history in histories.items():
            ax.plot([entry[column] for entry in history], label=name)
        ax.set(
            xlabel="epochs of training on task B",
            ylabel="test accuracy",
            title=title,
            ylim=(-0.02, 1.02),
        )
        ax.legend(fontsize=7)
    ax = axes[3]
    flat_online = torch.cat([values.flatten() for values in online]).double()
    flat_reference = torch.cat([values.flatten() for values in reference])
    ax.loglog(flat_reference.numpy(), flat_online.numpy(), ".", ms=2, alpha=0.5)
    positive = flat_reference[flat_reference > 0]
    low, high = positive.min().item(), positive.max().item()
    ax.plot([low, high], [low, high], "k--", linewidth=1, label="equal")
    ax.set(
        xlabel="dense reference diag(Qᵀ(GGN_A+GGN_B)Q)",
        ylabel="fit(A); fit(B, override=False)",
        title="online EKFAC eigenvalues in A's basis",
    )
    ax.legend(fontsize=7)
    path = plotting.save_figure(figure, args.out / "continual.png")
    print(f"\nWrote {path} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
