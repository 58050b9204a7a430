"""How close each structure's GLM predictive comes to the full-GGN Laplace.

Digits (scikit-learn, the evaluation split), float64, an MLP 64-40-10 and a small
CNN, each trained to a MAP; for the prior precisions 0.1, 1 and 10, every structure
is fitted on the training set with the exact GGN and its GLM predictive covariance
``J Σ Jᵀ`` on the 450 test images is compared with that of laplace-torch's full
Laplace (the reference): the mean over the images of

    ‖J Σ Jᵀ - J Σ_full Jᵀ‖_F / ‖J Σ_full Jᵀ‖_F

Structures: laplace-torch's KFAC; EKFAC; EKFAC with the exact block of every tensor
of at most 500 entries (``dense_blocks_up_to=500``), also with the low-rank
correction of rank 4, 8, 16 and 32 in the other blocks (``correction_rank``); the
exact block of every tensor
(block-diagonal exact GGN, no cross-tensor terms); and the blocks that
:func:`~ekfac_laplace.evaluation.structures.select_structures` chooses by evidence
within the memory of EKFAC+exact≤500, of EKFAC and of four times EKFAC's. Every
structure gets the same Jacobians. The memory column is what each posterior stores
(eigenvalues and eigenvectors, float64; KFAC: its factors and their eigenvectors).

Usage::

    python benchmarks/fidelity.py            # writes benchmarks/results/fidelity.*
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from laplace import Laplace
from laplace.curvature import CurvlinopsGGN
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

import ekfac_laplace  # noqa: F401  (registers hessian_structure="ekfac")
from ekfac_laplace.evaluation.data import load_digits_splits
from ekfac_laplace.evaluation.models import cnn, mlp, train_map
from ekfac_laplace.evaluation.structures import select_structures

RESULTS = Path(__file__).resolve().parent / "results"
PRIORS = (0.1, 1.0, 10.0)
#: The ranks of the low-rank correction's rows.
RANKS = (4, 8, 16, 32)
#: Row name to (hessian_structure, EKFAC options); "selected" is special.
STRUCTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "KFAC": ("kron", {}),
    "EKFAC": ("ekfac", {}),
    "EKFAC + exact ≤ 500": ("ekfac", {"dense_blocks_up_to": 500}),
    **{
        f"EKFAC + exact ≤ 500 + rank {k}": (
            "ekfac",
            {"dense_blocks_up_to": 500, "correction_rank": k},
        )
        for k in RANKS
    },
    "exact blocks (block-diagonal GGN)": ("ekfac", {"dense_blocks_up_to": 10**9}),
    "selected (evidence, EKFAC+exact≤500's memory)": ("ekfac", {}),
    "selected (evidence, EKFAC's memory)": ("ekfac", {}),
    "selected (evidence, 4 × EKFAC's memory)": ("ekfac", {}),
}
#: The budget of each "selected" row: the memory of the row named, times a factor.
BUDGETS = {
    "selected (evidence, EKFAC+exact≤500's memory)": ("EKFAC + exact ≤ 500", 1),
    "selected (evidence, EKFAC's memory)": ("EKFAC", 1),
    "selected (evidence, 4 × EKFAC's memory)": ("EKFAC", 4),
}


def models() -> dict[str, nn.Module]:
    """The two networks, seeded."""
    torch.manual_seed(0)
    networks = {"MLP 64-40-10": mlp((1, 8, 8), 10, hidden=(40,))}
    torch.manual_seed(0)
    networks["CNN 4-8 / 16"] = cnn((1, 8, 8), 10, channels=(4, 8), hidden=16)
    return {name: network.double() for name, network in networks.items()}


def stored_numbers(la: Any) -> int:
    """Numbers a posterior stores: its eigenvalues and eigenvectors.

    Per block, as the selection counts; for KFAC its factors' eigendecompositions;
    with a low-rank correction also its ``U`` and ``S`` and the sketches ``Y`` it
    keeps for online fits and states.
    """

    def count(tensors: Any) -> int:
        if isinstance(tensors, Tensor):
            return tensors.numel()
        return sum(count(item) for item in tensors)

    numbers = count(la.H.eigenvalues) + count(la.H.eigenvectors)
    corrections = [c for c in getattr(la.H, "corrections", []) if c is not None]
    sketches = [s.values for s in getattr(la, "_sketches", {}).values()]
    return numbers + count(corrections) + count(sketches)


def laplace(model: nn.Module, structure: str, prior: float, **options: Any) -> Any:
    """An all-weights Laplace object on the exact GGN."""
    return Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure=structure,
        backend=CurvlinopsGGN,
        prior_precision=prior,
        **options,
    )


def relative_error(variance: Tensor, reference: Tensor) -> float:
    """Mean over inputs of the relative Frobenius error."""
    difference = torch.linalg.matrix_norm(variance - reference)
    return float((difference / torch.linalg.matrix_norm(reference)).mean())


def run(
    epochs: int, priors: tuple[float, ...] = PRIORS, quick: bool = False
) -> dict[str, Any]:
    """Every model, prior and structure; the errors, fit times and memory.

    ``quick``: an MLP 64-8-10 on 128 training and 32 test images (a smoke run).
    """
    splits = load_digits_splits(0, dtype=torch.float64)
    train_set = splits.train
    X_test = splits.test.tensors[0]
    networks = models()
    if quick:
        train_set = Subset(train_set, range(128))
        X_test = X_test[:32]
        torch.manual_seed(0)
        networks = {"MLP 64-8-10": mlp((1, 8, 8), 10, hidden=(8,)).double()}
    train = DataLoader(train_set, batch_size=64, shuffle=True)
    fit = DataLoader(train_set, batch_size=256)
    results: dict[str, Any] = {"epochs": epochs, "priors": priors, "models": {}}
    for name, model in networks.items():
        train_map(model, train, "classification", epochs=epochs)
        n_params = sum(p.numel() for p in model.parameters())
        rows: dict[str, list[float]] = {row: [] for row in STRUCTURES}
        seconds: dict[str, list[float]] = {row: [] for row in STRUCTURES}
        memory: dict[str, list[int]] = {row: [] for row in STRUCTURES}
        for prior in priors:
            full = laplace(model, "full", prior)
            full.fit(fit)
            Js, _ = full.backend.jacobians(X_test)
            reference = full.functional_variance(Js)
            for row, (structure, options) in STRUCTURES.items():
                start = time.perf_counter()
                if row in BUDGETS:
                    base, factor = BUDGETS[row]
                    budget = memory[base][-1] * factor
                    la = select_structures(
                        laplace(model, structure, prior), fit, budget
                    ).laplace
                else:
                    la = laplace(model, structure, prior, **options)
                    la.fit(fit)
                seconds[row].append(time.perf_counter() - start)
                memory[row].append(stored_numbers(la) * 8)
                error = relative_error(la.functional_variance(Js), reference)
                rows[row].append(error)
                print(f"{name} prior {prior:g} {row}: {error:.4f}", flush=True)
        results["models"][name] = {
            "n_params": n_params,
            "errors": rows,
            "fit_seconds": seconds,
            "stored_bytes": memory,
        }
    return results


def table(results: dict[str, Any]) -> str:
    """Mean relative error over the priors, per model and structure."""
    names = list(results["models"])
    lines = [
        "| structure | "
        + " | ".join(f"{name} error | {name} KiB" for name in names)
        + " |",
        "|---|" + "---:|---:|" * len(names),
    ]
    for row in STRUCTURES:
        cells = []
        for name in names:
            errors = results["models"][name]["errors"][row]
            base = results["models"][name]["errors"]["EKFAC"]
            mean, base_mean = sum(errors) / len(errors), sum(base) / len(base)
            change = ""
            if row != "EKFAC":
                change = f" ({(mean / base_mean - 1) * 100:+.0f}%)"
            per_prior = " / ".join(f"{e:.3f}" for e in errors)
            stored = results["models"][name]["stored_bytes"][row]
            kib = " / ".join(sorted({f"{b / 1024:.0f}" for b in stored}, key=float))
            cells.append(f"{mean:.3f}{change} [{per_prior}] | {kib}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    priors = (1.0,) if args.quick else PRIORS
    results = run(1 if args.quick else args.epochs, priors, args.quick)
    markdown = table(results)
    print(markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fidelity.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "fidelity.md").write_text(
        "Mean relative Frobenius error of the GLM predictive covariance against the "
        "full-GGN Laplace on the 450 digits test images, averaged over the priors "
        f"{', '.join(f'{p:g}' for p in priors)} (per prior in brackets; change against "
        "EKFAC in parentheses). `python benchmarks/fidelity.py`\n\n" + markdown + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
