"""Two moons: MAP vs last-layer and all-weights EKFAC Laplace confidence maps.

Trains a ReLU MLP (the MAP) on scikit-learn's two moons, fits last-layer and
all-weights EKFAC Laplace approximations, tunes the prior precision by marginal
likelihood and compares the probit GLM predictive with the MAP: test accuracy, NLL
and ECE, and the mean top-label probability on points far from the data (on a
circle of radius ``--far-radius`` around the data's centre). A ReLU network's MAP
grows arbitrarily confident far from the data (Hein et al., 2019); the Laplace
predictive should be much less so (Kristiadi et al., 2020). ``confidence_maps.png``
shows the maximum predictive probability of each model over the plane.

Run: ``python examples/example_classification_2d.py [--out DIR]`` (about
5 seconds on 2 CPU cores; figures go to ``example-output/classification_2d/`` in
the current folder).
"""

from __future__ import annotations

import argparse
import math
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
from torch.utils.data import DataLoader

from ekfac_laplace.evaluation import data, evaluate, plotting
from ekfac_laplace.evaluation.models import mlp, train_map

# laplace-torch reminds on every prior tuning that the default link is probit, even
# when link_approx is passed; we pass it.
warnings.filterwarnings("ignore", message="By default `link_approx` is `probit`")


def far_points(centre: Tensor, radius: float, n: int = 360) -> Tensor:
    """``n`` points evenly spaced on a circle, shape ``(n, 2)``."""
    angles = torch.linspace(0, 2 * math.pi, n + 1, dtype=centre.dtype)[:-1]
    return centre + radius * torch.stack([angles.cos(), angles.sin()], dim=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=50, help="width of 2 layers")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--far-radius", type=float, default=10.0)
    parser.add_argument("--resolution", type=int, default=120, help="map grid side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path("example-output") / "classification_2d"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()

    splits = data.two_moons(args.n_train, seed=args.seed)
    print(splits.description)
    X_train, y_train = splits.train.tensors
    train_loader = DataLoader(splits.train, batch_size=50, shuffle=True)
    test_loader = DataLoader(splits.test, batch_size=500)

    torch.manual_seed(args.seed)
    model = mlp((2,), 2, hidden=(args.hidden, args.hidden), activation=nn.ReLU)
    train_map(model, train_loader, "classification", epochs=args.epochs, seed=args.seed)

    far = far_points(X_train.mean(0), args.far_radius)
    predictors = {"MAP": lambda x: model(x).softmax(-1)}
    rows = [("MAP", evaluate(model, test_loader, likelihood="classification"))]
    fit_loader = DataLoader(splits.train, batch_size=len(splits.train))
    for name, subset in (("LL EKFAC", "last_layer"), ("all EKFAC", "all")):
        la = Laplace(
            model, "classification", subset_of_weights=subset, hessian_structure="ekfac"
        )
        la.fit(fit_loader)
        la.optimize_prior_precision(method="marglik", link_approx="probit")
        print(
            f"{name:<10} prior precision {la.prior_precision.item():.3g}  log marginal "
            f"likelihood {la.log_marginal_likelihood().item():.1f}"
        )
        predictors[name] = lambda x, la=la: la(x, pred_type="glm", link_approx="probit")
        rows.append((name, evaluate(la, test_loader)))

    print(
        f"\n{'model':<10} {'accuracy':>8} {'nll':>6} {'ece':>6} "
        f"{'max_prob@r=' + format(args.far_radius, 'g'):>14}"
    )
    with torch.no_grad():
        for name, metrics in rows:
            far_confidence = predictors[name](far).max(-1).values.mean().item()
            print(
                f"{name:<10} {metrics['accuracy']:>8.3f} {metrics['nll']:>6.3f} "
                f"{metrics['ece']:>6.3f} {far_confidence:>14.3f}"
            )

    figure, axes = plotting.new_figure(len(predictors), size=(4.4, 3.6))
    for ax, (name, predict_proba) in zip(axes, predictors.items()):
        plotting.confidence_map(
            predict_proba,
            X_train,
            y_train,
            ax=ax,
            title=name,
            resolution=args.resolution,
            margin=2.5,
        )
    path = plotting.save_figure(figure, args.out / "confidence_maps.png")
    print(f"\nWrote {path} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
