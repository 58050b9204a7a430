"""The ``ekfac-laplace`` command: compare Laplace approximations, draw samples.

``ekfac-laplace compare`` trains (or loads) a MAP network on a bundled data set, fits
every candidate Laplace approximation around it, prints one table and writes
``results.json``, ``results.csv`` and plots. ``ekfac-laplace sample`` fits EKFAC
Laplace, draws posterior samples in the eigenbasis and writes their predictive
summary and a plot. Run ``ekfac-laplace <command> --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from laplace.baselaplace import BaseLaplace
from torch import nn

from ekfac_laplace.evaluation.candidates import DEFAULT_CANDIDATES, Candidate
from ekfac_laplace.evaluation.comparison import (
    PRIOR_TUNINGS,
    EvaluationSettings,
    compare,
    residual_noise_scale,
    tune_prior,
)
from ekfac_laplace.evaluation.metrics import Predictions
from ekfac_laplace.evaluation.problems import DATASETS, Problem, load_problem
from ekfac_laplace.evaluation.report import SELECTION_CRITERIA
from ekfac_laplace.evaluation.sampling import SampleCheck

DEFAULT_OUT = "ekfac-laplace-results"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class UsageError(ValueError):
    """A bad combination of command-line arguments (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``ekfac-laplace`` argument parser.

    Returns:
        The parser with the ``compare`` and ``sample`` commands.
    """
    parser = _Parser(
        prog="ekfac-laplace",
        description=(
            "Laplace approximations for neural networks, EKFAC included. "
            "'compare' fits several Laplace approximations around one trained "
            "network and reports calibration, evidence and cost; 'sample' draws "
            "EKFAC posterior samples. Everything runs offline on bundled data."
        ),
        epilog="Example: ekfac-laplace compare --out results/",
    )
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_Parser
    )
    commands.required = True
    common = _common_arguments()
    _add_compare_command(commands, common)
    _add_sample_command(commands, common)
    return parser


def _common_arguments() -> argparse.ArgumentParser:
    """The data, model and output arguments both commands share."""
    common = _Parser(add_help=False)
    data = common.add_argument_group("data and model")
    data.add_argument(
        "--dataset",
        choices=DATASETS,
        default="digits",
        help="bundled data set: digits (8x8 images, 10 classes; with rotation/noise "
        "shift and natural-image OOD sets), moons (2-D, 2 classes), toy1d (1-D "
        "regression with a gap), diabetes (tabular regression). Default: digits.",
    )
    data.add_argument(
        "--model",
        choices=("mlp", "cnn"),
        default="mlp",
        help="network trained to the MAP (cnn needs an image data set). Default: mlp.",
    )
    data.add_argument(
        "--checkpoint",
        type=Path,
        help="load the MAP weights from this state_dict file instead of training",
    )
    data.add_argument(
        "--save-checkpoint",
        type=Path,
        help="save the trained MAP weights (a state_dict) to this file",
    )
    data.add_argument(
        "--epochs", type=_positive_int, default=60, help="MAP training epochs (60)"
    )
    data.add_argument(
        "--batch-size", type=_positive_int, default=64, help="batch size (64)"
    )
    data.add_argument("--seed", type=int, default=0, help="seed of everything (0)")
    output = common.add_argument_group("output")
    output.add_argument(
        "--out",
        type=Path,
        default=Path(DEFAULT_OUT),
        help=f"output folder (default: ./{DEFAULT_OUT})",
    )
    output.add_argument("--no-plots", action="store_true", help="skip the figures")
    output.add_argument(
        "--quiet", action="store_true", help="no progress bars, only the results"
    )
    return common


def _add_compare_command(commands: Any, common: argparse.ArgumentParser) -> None:
    compare = commands.add_parser(
        "compare",
        parents=[common],
        help="fit and compare Laplace approximations (the main job)",
        description=(
            "Train the MAP network, fit every candidate Laplace approximation around "
            "it, tune each prior precision, and evaluate accuracy, NLL, ECE, Brier, "
            "OOD detection and robustness to shift. Writes results.json, results.csv "
            "and plots to --out. The defaults take about two minutes on 2 CPU cores."
        ),
    )
    compare.add_argument(
        "--candidates",
        nargs="+",
        default=list(DEFAULT_CANDIDATES),
        metavar="SPEC",
        help="'map' or '<ll|all>_<diag|kron|ekfac|full|lowrank>[:<ggn|mc|ef>]', "
        f"e.g. all_ekfac ll_kron:mc (default: {' '.join(DEFAULT_CANDIDATES)})",
    )
    _add_laplace_options(compare, PRIOR_TUNINGS)
    compare.add_argument(
        "--pred",
        choices=("glm", "nn"),
        default="glm",
        help="predictive: glm (linearised, default) or nn (sampled networks)",
    )
    compare.add_argument(
        "--link",
        choices=("probit", "bridge", "bridge_norm", "mc"),
        default="probit",
        help="GLM link approximation for classification (default: probit)",
    )
    compare.add_argument(
        "--select-by",
        choices=SELECTION_CRITERIA,
        help="how to pick the recommended candidate (default: evidence with "
        "--prior-tuning marglik, else val_nll)",
    )
    compare.set_defaults(handler=run_compare)


def _add_sample_command(commands: Any, common: argparse.ArgumentParser) -> None:
    sample = commands.add_parser(
        "sample",
        parents=[common],
        help="draw EKFAC posterior samples and summarise their predictive",
        description=(
            "Train the MAP network, fit EKFAC Laplace, tune the prior, draw posterior "
            "samples theta = theta* + Q diag((lambda+delta)^-1/2) z and compare the "
            "sampled predictive with the linearised one. Writes samples.json, a plot "
            "and (with --save-samples) the samples themselves."
        ),
    )
    sample.add_argument(
        "--subset",
        choices=("all", "last_layer"),
        default="all",
        help="weights treated as random (default: all)",
    )
    _add_laplace_options(sample, ("marglik", "none"))
    sample.add_argument(
        "--save-samples",
        action="store_true",
        help="also write the samples (n_samples x n_params) to samples.pt",
    )
    sample.set_defaults(handler=run_sample)


def _add_laplace_options(
    parser: argparse.ArgumentParser, tunings: Sequence[str]
) -> None:
    parser.add_argument(
        "--prior-tuning",
        choices=tunings,
        default="marglik",
        help="tune the prior precision by marginal likelihood (marglik, default)"
        + (", validation NLL (gridsearch)" if "gridsearch" in tunings else "")
        + " or not at all (none)",
    )
    parser.add_argument(
        "--prior-structure",
        choices=("scalar", "layerwise"),
        default="scalar",
        help="one prior precision, or one per parameter tensor (default: scalar)",
    )
    parser.add_argument(
        "--n-samples",
        type=_positive_int,
        default=100,
        help="samples for the nn / mc predictives and for 'sample' (100)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ekfac-laplace`` command.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when ``None``.

    Returns:
        The exit status: 0 on success, 2 for bad arguments.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_arguments(args)
        return args.handler(args)
    except UsageError as error:
        print(f"ekfac-laplace {args.command}: error: {error}", file=sys.stderr)
        return 2


def run_compare(args: argparse.Namespace) -> int:
    """``ekfac-laplace compare``: fit, evaluate and report every candidate.

    Args:
        args: Parsed arguments.

    Returns:
        Exit status 0.
    """
    from ekfac_laplace.evaluation.figures import write_comparison_plots

    problem, model = _problem_and_model(args)
    settings = EvaluationSettings(
        prior_tuning=args.prior_tuning,
        prior_structure=args.prior_structure,
        pred_type=args.pred,
        link_approx=args.link,
        n_samples=args.n_samples,
        seed=args.seed,
        progress_bar=not args.quiet,
        keep_fitted=not args.no_plots and args.dataset in ("moons", "toy1d"),
    )
    started = time.perf_counter()
    comparison = compare(
        model,
        problem.likelihood,
        problem.train_loader,
        problem.test_loader,
        candidates=args.candidates,
        val_loader=problem.val_loader,
        ood_loader=problem.ood_loader,
        shift_loaders=problem.shift_loaders,
        settings=settings,
    )
    comparison.config.update(
        dataset=args.dataset,
        model=args.model,
        seed=args.seed,
        epochs=args.epochs,
        description=problem.splits.description,
        seconds=time.perf_counter() - started,
    )
    if args.select_by is None:
        args.select_by = "evidence" if args.prior_tuning == "marglik" else "val_nll"
    try:
        selection = comparison.select(args.select_by)
        comparison.config["selection"] = vars(selection)
    except ValueError as error:
        selection = None
        comparison.config["selection"] = {"error": str(error)}
    args.out.mkdir(parents=True, exist_ok=True)
    written = [comparison.to_json(args.out / "results.json")]
    written.append(comparison.to_csv(args.out / "results.csv"))
    (args.out / "results.md").write_text(comparison.table(markdown=True) + "\n")
    written.append(args.out / "results.md")
    if not args.no_plots:
        written += write_comparison_plots(comparison, problem, args.out)

    print(f"\n{problem.splits.description}")
    print(comparison.table())
    if selection is not None:
        print(f"\nRecommended ({args.select_by}): {selection.reason}")
    failed = [row.candidate for row in comparison.rows if not row.ok]
    if failed:
        print(f"Failed candidates (see the error column): {', '.join(failed)}")
    print("\nWrote " + ", ".join(str(path) for path in written))
    return 0


def run_sample(args: argparse.Namespace) -> int:
    """``ekfac-laplace sample``: EKFAC posterior samples and their predictive.

    Args:
        args: Parsed arguments.

    Returns:
        Exit status 0.
    """
    from ekfac_laplace.evaluation.figures import write_sample_plot
    from ekfac_laplace.evaluation.sampling import check_samples

    problem, model = _problem_and_model(args)
    la = _fitted_ekfac(args, model, problem)
    samples = la.sample(
        args.n_samples, generator=torch.Generator().manual_seed(args.seed)
    )
    check = check_samples(la, samples)
    predictions, metrics = _sample_predictives(args, model, la, problem)
    summary = {
        "dataset": args.dataset,
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
        "test_metrics": metrics,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    written = [args.out / "samples.json"]
    written[0].write_text(json.dumps(summary, indent=2) + "\n")
    if args.save_samples:
        torch.save(samples, args.out / "samples.pt")
        written.append(args.out / "samples.pt")
    if not args.no_plots:
        written.append(write_sample_plot(predictions, check, args.out / "samples.png"))
    print(f"\n{problem.splits.description}")
    _print_sample_summary(args, summary, check, metrics)
    print("\nWrote " + ", ".join(str(path) for path in written))
    return 0


def _fitted_ekfac(
    args: argparse.Namespace, model: nn.Module, problem: Problem
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
    la.fit(problem.train_loader, progress_bar=not args.quiet)
    settings = EvaluationSettings(
        prior_tuning=args.prior_tuning, prior_structure=args.prior_structure
    )
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
    print(
        f"EKFAC Laplace ({args.subset} weights, {summary['n_params']:,} parameters), "
        f"{args.n_samples} samples; log marginal likelihood "
        f"{summary['log_marginal_likelihood']:.1f}"
    )
    expected = check.expected_median_relative_error or 0.0
    print(
        "sample variance vs analytic: median relative error "
        f"{check.median_relative_error:.3f} (Monte-Carlo "
        f"expectation for {args.n_samples} samples: {expected:.3f})"
    )
    for name, values in metrics.items():
        shown = "  ".join(f"{key} {value:.4f}" for key, value in values.items())
        print(f"{name:<8} {shown}")
    if metrics["samples"]["nll"] > metrics["glm"]["nll"]:
        print(
            "Note: the sampled-network ('nn') predictive is worse than the linearised "
            "('glm') one, as is common for wide all-weights posteriors (Immer et al., "
            "2021); the GLM predictive is the one consistent with the GGN posterior."
        )


def _problem_and_model(args: argparse.Namespace) -> tuple[Problem, nn.Module]:
    """Seed everything, load the data set, train (or load) the MAP network."""
    torch.manual_seed(args.seed)
    problem = load_problem(args.dataset, args.seed, args.batch_size)
    return problem, map_model(args, problem)


def map_model(args: argparse.Namespace, problem: Problem) -> nn.Module:
    """Train the MAP network, or load it from ``--checkpoint``.

    Args:
        args: Parsed arguments (model, checkpoint, epochs, seed, quiet).
        problem: The data.

    Returns:
        The network in eval mode.

    Raises:
        UsageError: If the checkpoint cannot be read or does not fit the model.
    """
    from ekfac_laplace.evaluation.models import build_model, train_map

    splits = problem.splits
    model = build_model(
        args.model, splits.input_shape, splits.n_outputs, seed=args.seed
    )
    if args.checkpoint is not None:
        try:
            state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except (OSError, RuntimeError, KeyError, TypeError) as error:
            first_line = str(error).strip().split("\n")[0]
            raise UsageError(
                f"cannot load --checkpoint {args.checkpoint} into the {args.model} "
                f"for {args.dataset}: {first_line}"
            ) from error
        return model.eval()
    train_map(
        model,
        problem.train_loader,
        splits.likelihood,
        epochs=args.epochs,
        seed=args.seed,
        progress_bar=not args.quiet,
    )
    if args.save_checkpoint is not None:
        args.save_checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.save_checkpoint)
    return model


def _check_arguments(args: argparse.Namespace) -> None:
    if args.model == "cnn" and args.dataset not in ("digits",):
        raise UsageError(
            f"--model cnn needs an image data set; {args.dataset} has vector inputs "
            "(use --model mlp or --dataset digits)"
        )
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise UsageError(f"--checkpoint {args.checkpoint} is not a file")
    if args.command == "compare":
        try:
            for spec in args.candidates:
                Candidate.parse(spec)
        except ValueError as error:
            raise UsageError(str(error)) from error
        if len(set(args.candidates)) != len(args.candidates):
            raise UsageError(f"--candidates lists a candidate twice: {args.candidates}")
        if args.prior_tuning == "gridsearch" and args.prior_structure != "scalar":
            raise UsageError(
                "--prior-tuning gridsearch tunes a scalar prior; drop "
                "--prior-structure layerwise or use --prior-tuning marglik"
            )
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
