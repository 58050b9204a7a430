"""Posterior samples in the EKFAC eigenbasis, checked against the analytic posterior.

Trains a small MLP (the MAP) on scikit-learn's bundled digits, fits an all-weights
EKFAC Laplace approximation, tunes the prior precision by marginal likelihood and
draws ``S`` samples ``θ = θ* + Q diag((λ/(σ²T) + δ)^{-1/2}) z`` with
``la.sample(S, generator=...)``. It compares

- the sample covariance of a few parameter blocks (the last layer's bias, the last
  layer's weights into class 0, the first layer's bias) with the same blocks of the
  analytic ``la.posterior_covariance``: the relative Frobenius error
  ``‖Σ̂ - Σ‖_F / ‖Σ‖_F`` against its Monte-Carlo expectation
  ``sqrt(((tr Σ)² + tr Σ²) / S) / ‖Σ‖_F`` (``Σ̂`` about the known mean ``θ*``);
- the samples' marginal variances with ``la.posterior_variance`` (median relative
  error against its expected median ``0.674 · sqrt(2 / S)``);
- the sampling predictive (``pred_type="nn"``: the network evaluated at each
  sample, softmax averaged) with the probit GLM predictive on the test set
  (accuracy, NLL, ECE). Expect the sampling predictive to be far less confident
  than the GLM predictive: perturbing all weights of the nonlinear network by the
  linearised posterior's spread underfits (Immer et al., 2021); the GLM predictive
  is the one consistent with the Laplace approximation.

``la.posterior_covariance`` is a dense ``P × P`` matrix, so the model is kept small
(about 2,400 parameters by default; ``--hidden`` sets the width); sampling itself
needs only one rotation per block and scales like KFAC. Figure: ``sampling.png``
(sample vs analytic marginal variances, the analytic and sample covariance of the
last layer's bias, and the two predictives' confidence per test image).

Run: ``python examples/example_sampling.py [--out DIR]`` (about 5 seconds on
2 CPU cores; figures go to ``example-output/sampling/`` in the current folder).
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
from torch import Tensor
from torch.utils.data import DataLoader

from ekfac_laplace.evaluation import (
    ClassificationPredictions,
    classification_metrics,
    data,
    plotting,
)
from ekfac_laplace.evaluation.models import mlp, train_map

# laplace-torch reminds on every prior tuning that the default link is probit; we use
# probit for the GLM predictive.
warnings.filterwarnings("ignore", message="By default `link_approx` is `probit`")


def parameter_blocks(model: torch.nn.Sequential, n_classes: int) -> dict[str, Tensor]:
    """Indices into the parameter vector of a few blocks to compare, by name."""
    offsets, start = {}, 0
    for name, parameter in model.named_parameters():
        offsets[name] = (start, parameter.shape)
        start += parameter.numel()
    linear = [name[: -len(".weight")] for name in offsets if name.endswith(".weight")]
    first, last = linear[0], linear[-1]
    last_start, (_, width) = offsets[f"{last}.weight"]
    bias_start = offsets[f"{last}.bias"][0]
    first_bias_start, (first_width,) = offsets[f"{first}.bias"]
    return {
        "last-layer bias": torch.arange(bias_start, bias_start + n_classes),
        "last-layer weights, class 0": torch.arange(last_start, last_start + width),
        "first-layer bias": torch.arange(
            first_bias_start, first_bias_start + first_width
        ),
    }


def covariance_error(samples: Tensor, mean: Tensor, covariance: Tensor) -> tuple:
    """Relative Frobenius error of the sample covariance and its expectation."""
    centred = samples - mean
    sample_covariance = centred.T @ centred / len(samples)
    norm = torch.linalg.matrix_norm(covariance)
    error = torch.linalg.matrix_norm(sample_covariance - covariance) / norm
    trace = covariance.trace()
    expected = torch.sqrt((trace**2 + covariance.square().sum()) / len(samples)) / norm
    return sample_covariance, error.item(), expected.item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=32, help="width of 1 layer")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--n-samples", type=int, default=2000, help="S")
    parser.add_argument(
        "--n-predictive-samples", type=int, default=200, help="for pred_type='nn'"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("example-output") / "sampling")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    splits = data.load_digits_splits(seed=args.seed)
    print(splits.description)
    torch.manual_seed(args.seed)
    model = mlp(splits.input_shape, splits.n_outputs, hidden=(args.hidden,))
    train_loader = DataLoader(splits.train, batch_size=64, shuffle=True)
    train_map(model, train_loader, "classification", epochs=args.epochs, seed=args.seed)

    la = Laplace(
        model, "classification", subset_of_weights="all", hessian_structure="ekfac"
    )
    la.fit(DataLoader(splits.train, batch_size=256))
    la.optimize_prior_precision(method="marglik", link_approx="probit")
    print(
        f"EKFAC Laplace: {la.n_params:,} parameters, prior precision "
        f"{la.prior_precision.item():.3g}; dense covariance "
        f"{la.n_params}x{la.n_params} ({la.n_params**2 * 4 / 2**20:.0f} MiB in float32)"
    )

    generator = torch.Generator().manual_seed(args.seed)
    samples = la.sample(args.n_samples, generator=generator)
    covariance = la.posterior_covariance
    print(f"\n{args.n_samples} samples: covariance blocks (relative Frobenius error)")
    print(f"{'block':<28} {'size':>5} {'error':>8} {'expected':>9}")
    blocks = {}
    for name, index in parameter_blocks(model, splits.n_outputs).items():
        block = covariance[index][:, index]
        sample_block, error, expected = covariance_error(
            samples[:, index], la.mean[index], block
        )
        blocks[name] = (block, sample_block)
        print(f"{name:<28} {len(index):>5} {error:>8.4f} {expected:>9.4f}")

    analytic_variance = la.posterior_variance
    sample_variance = (samples - la.mean).square().mean(0)
    relative = (sample_variance / analytic_variance - 1).abs()
    # The relative error of one variance is about N(0, 2/S); its median |.| is
    # 0.674 sqrt(2/S).
    print(
        f"{'marginal variances (all)':<28} {la.n_params:>5} "
        f"{relative.median().item():>8.4f} "
        f"{0.674 * math.sqrt(2 / args.n_samples):>9.4f}  (median relative error)"
    )
    inside = (relative < 2 * math.sqrt(2 / args.n_samples)).double().mean().item()
    print(f"marginal variances within ±2 sd of Monte-Carlo noise: {inside:.1%} (~95%)")
    diagonal_gap = (covariance.diagonal() - analytic_variance).abs().max()
    print(f"max |diag(posterior_covariance) - posterior_variance| = {diagonal_gap:.2e}")

    X_test, y_test = splits.test.tensors
    with torch.no_grad():
        predictives = {
            "MAP": model(X_test).softmax(-1),
            "GLM probit": la(X_test, pred_type="glm", link_approx="probit"),
            "NN samples": la.predictive_samples(
                X_test,
                pred_type="nn",
                n_samples=args.n_predictive_samples,
                generator=generator,
            ).mean(0),
        }
    print(f"\n{'predictive':<12} {'accuracy':>8} {'nll':>7} {'ece':>7}")
    for name, probs in predictives.items():
        metrics = classification_metrics(ClassificationPredictions(probs, y_test))
        print(
            f"{name:<12} {metrics['accuracy']:>8.4f} {metrics['nll']:>7.4f} "
            f"{metrics['ece']:>7.4f}"
        )

    figure, axes = plotting.new_figure(4, ncols=2, size=(4.4, 3.6))
    ax = axes[0]
    low, high = analytic_variance.min().item(), analytic_variance.max().item()
    # The variance of S Gaussian draws around the known mean has a relative sd of
    # sqrt(2/S).
    spread = 2 * math.sqrt(2 / args.n_samples)
    ax.fill_between(
        [low, high],
        [low * (1 - spread), high * (1 - spread)],
        [low * (1 + spread), high * (1 + spread)],
        color="0.85",
        label="±2 sd of Monte-Carlo noise",
    )
    ax.plot(analytic_variance.numpy(), sample_variance.numpy(), ".", ms=2, alpha=0.4)
    ax.plot([low, high], [low, high], "k--", linewidth=1, label="equal")
    ax.set(
        xlabel="analytic posterior variance",
        ylabel=f"sample variance (S = {args.n_samples})",
        title="marginal variance per parameter",
    )
    ax.legend(fontsize=7)
    bias_blocks = blocks["last-layer bias"]
    scale = bias_blocks[0].abs().max().item()
    for ax, matrix, title in zip(
        axes[1:3], bias_blocks, ("analytic", f"sample (S = {args.n_samples})")
    ):
        image = ax.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-scale, vmax=scale)
        ax.set(title=f"last-layer bias covariance, {title}", xlabel="class")
        ax.set_ylabel("class")
        figure.colorbar(image, ax=ax)
    ax = axes[3]
    glm = predictives["GLM probit"].max(-1).values.numpy()
    nn = predictives["NN samples"].max(-1).values.numpy()
    ax.plot(glm, nn, ".", markersize=3, alpha=0.5)
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set(
        xlabel="GLM probit confidence",
        ylabel="NN-sampling confidence",
        title="top-label probability per test image",
        xlim=(0, 1.02),
        ylim=(0, 1.02),
    )
    path = plotting.save_figure(figure, args.out / "sampling.png")
    print(f"\nWrote {path} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
