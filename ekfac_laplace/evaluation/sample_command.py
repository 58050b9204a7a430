"""The ``ekfac-laplace sample`` command: EKFAC posterior samples and their predictive.

:func:`run_sample` fits EKFAC Laplace around the MAP network, tunes its prior, draws
posterior samples in the eigenbasis, checks them against the analytic posterior
(:func:`~ekfac_laplace.evaluation.sampling.check_samples`), compares the test
predictives of the MAP, the linearised (GLM) Laplace and the sampled networks, and
writes ``samples.json``, ``samples.png`` and (with ``--save-samples``) the samples.
Its arguments are parsed by :mod:`~ekfac_laplace.evaluation.cli`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from laplace.baselaplace import BaseLaplace
from torch import nn
from tqdm import tqdm

from ekfac_laplace.evaluation.command_steps import (
    problem_and_model,
    progress_bar,
    step,
)
from ekfac_laplace.evaluation.comparison import (
    EvaluationSettings,
    residual_noise_scale,
    tune_prior,
)
from ekfac_laplace.evaluation.metrics import Predictions
from ekfac_laplace.evaluation.problems import Problem
from ekfac_laplace.evaluation.report import json_safe
from ekfac_laplace.evaluation.sampling import SampleCheck


def run_sample(args: argparse.Namespace) -> int:
    """``ekfac-laplace sample``: EKFAC posterior samples and their predictive.

    Args:
        args: Parsed arguments.

    Returns:
        Exit status 0.
    """
    from ekfac_laplace.evaluation.figures import write_sample_plot
    from ekfac_laplace.evaluation.sampling import check_samples

    n_steps = 4 + (args.checkpoint is None and args.epochs > 0) + (not args.no_plots)
    with progress_bar(args, n_steps) as bar:
        problem, model = problem_and_model(args, bar)
        la = _fitted_ekfac(args, model, problem, bar)
        with step(bar, f"drawing {args.n_samples} samples"):
            samples = la.sample(
                args.n_samples, generator=torch.Generator().manual_seed(args.seed)
            )
            check = check_samples(la, samples)
        with step(bar, "test predictives"):
            predictions, metrics = _sample_predictives(args, model, la, problem)
        summary = {
            "dataset": problem.name,
            "model": args.model,
            "subset_of_weights": args.subset,
            "n_params": int(la.n_params),
            "n_samples": args.n_samples,
            "prior_precision": la.prior_precision.flatten().tolist(),
            "log_marginal_likelihood": float(la.log_marginal_likelihood()),
            "posterior_std_mean": float(check.analytic_variance.sqrt().mean()),
            "sample_variance_relative_error_median": check.median_relative_error,
            "sample_variance_relative_error_expected_median": (
                check.expected_median_relative_error
            ),
            "sample_mean_error_in_std": check.mean_error_in_std,
            "sample_mean_error_in_std_expected": check.expected_mean_error_in_std,
            "test_metrics": metrics,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        written = [args.out / "samples.json"]
        text = json.dumps(json_safe(summary), indent=2, allow_nan=False)
        written[0].write_text(text + "\n")
        if args.save_samples:
            torch.save(samples, args.out / "samples.pt")
            written.append(args.out / "samples.pt")
        if not args.no_plots:
            with step(bar, "figure"):
                path = write_sample_plot(predictions, check, args.out / "samples.png")
                written.append(path)
    print(f"\n{problem.splits.description}")
    _print_sample_summary(args, summary, check, metrics)
    print("\nWrote " + ", ".join(str(path) for path in written))
    return 0


def _fitted_ekfac(
    args: argparse.Namespace, model: nn.Module, problem: Problem, bar: tqdm
) -> BaseLaplace:
    """EKFAC Laplace on the problem's training data, its prior tuned as asked."""
    from laplace import Laplace

    sigma_noise = 1.0
    if problem.likelihood == "regression":
        sigma_noise = residual_noise_scale(model, problem.train_loader)
    la = Laplace(
        model,
        problem.likelihood,
        subset_of_weights=args.subset,
        hessian_structure="ekfac",
        sigma_noise=sigma_noise,
    )
    with step(bar, "fitting EKFAC"):
        la.fit(problem.train_loader, progress_bar=False)
    settings = EvaluationSettings(
        prior_tuning=args.prior_tuning,
        prior_structure=args.prior_structure,
        progress_bar=False,
    )
    with step(bar, "tuning the prior"):
        tune_prior(la, settings)
    return la


def _sample_predictives(
    args: argparse.Namespace, model: nn.Module, la: BaseLaplace, problem: Problem
) -> tuple[dict[str, Predictions], dict[str, dict[str, float]]]:
    """Test predictions and metrics of the MAP, the GLM and the sampled networks."""
    from ekfac_laplace.evaluation.metrics import metrics_of
    from ekfac_laplace.evaluation.predictions import predict

    options = {
        "map": {"likelihood": problem.likelihood, "sigma_noise": float(la.sigma_noise)},
        "glm": {"pred_type": "glm", "link_approx": "probit"},
        "samples": {
            "pred_type": "nn",
            "link_approx": "mc",
            "n_samples": args.n_samples,
        },
    }
    predictions, metrics = {}, {}
    for name, kwargs in options.items():
        predictor = model if name == "map" else la
        torch.manual_seed(args.seed)
        predictions[name] = predict(predictor, problem.test_loader, **kwargs)
        metrics[name] = metrics_of(predictions[name])
    return predictions, metrics


def _print_sample_summary(
    args: argparse.Namespace,
    summary: dict[str, Any],
    check: SampleCheck,
    metrics: dict[str, dict[str, float]],
) -> None:
    """What ``sample`` shows: the samples' agreement first, then the predictives."""
    subset = "all weights" if args.subset == "all" else "last layer"
    prior = summary["prior_precision"]
    prior_text = f"{prior[0]:.4g}" if len(prior) == 1 else f"{len(prior)} values"
    print(
        f"EKFAC Laplace ({subset}, {summary['n_params']:,} parameters): prior "
        f"precision {prior_text}, log marginal likelihood "
        f"{summary['log_marginal_likelihood']:.1f}"
    )
    samples = _plural(args.n_samples, "sample")
    print(
        f"\n1. {samples} of the posterior against the analytic posterior (errors "
        "beside their Monte-Carlo expectation):"
    )
    if check.expected_median_relative_error is None:
        print("   one sample has no variance to check; draw more with --n-samples")
    else:
        print(
            "   variances: median |sample var / analytic var - 1| = "
            f"{check.median_relative_error:.3f} (expected "
            f"{check.expected_median_relative_error:.3f})"
        )
    print(
        "   means:     mean |sample mean - MAP| / posterior std = "
        f"{check.mean_error_in_std:.3f} (expected "
        f"{check.expected_mean_error_in_std:.3f})"
    )
    verdict = check.within_monte_carlo_noise()
    if verdict is not None:
        print(
            "   -> the samples agree with the analytic posterior up to Monte-Carlo "
            "noise"
            if verdict
            else "   -> the samples differ from the analytic posterior by more than "
            "Monte-Carlo noise; please report this with the command line"
        )
    link = ", probit" if "accuracy" in metrics["glm"] else ""  # classification
    print(f"\n2. Test predictive of the MAP and the linearised (GLM{link}) Laplace:")
    for name, label in (("map", "MAP"), ("glm", "GLM")):
        print(f"   {label:<8}{_metric_line(metrics[name])}")
    networks = _plural(args.n_samples, "sampled network")
    print(f"\n3. Test predictive of {networks} (nn):")
    print(f"   {'sampled':<8}{_metric_line(metrics['samples'])}")
    if metrics["samples"]["nll"] > metrics["glm"]["nll"]:
        although = " although the samples are right" if verdict else ""
        advice = ", or --subset last_layer" if args.subset == "all" else ""
        print(
            f"   Worse than the GLM{although}: networks whose weights are drawn "
            "from this posterior leave the region where the network is close to "
            "its linearisation, which the GGN posterior describes (Immer et al., "
            f"2021); use the GLM predictive{advice}."
        )
    else:
        print("   As good as the GLM predictive: the network is near-linear here.")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _metric_line(values: dict[str, float]) -> str:
    return "  ".join(f"{key} {value:.4f}" for key, value in values.items())
