"""The ``ekfac-laplace`` command: compare Laplace approximations, draw samples.

``ekfac-laplace compare`` trains (or loads) a MAP network on a bundled data set, fits
every candidate Laplace approximation around it, prints one table and writes
``results.json``, ``results.csv`` and plots. ``ekfac-laplace sample`` fits EKFAC
Laplace, draws posterior samples in the eigenbasis, checks them against the analytic
posterior and writes their predictive summary and a plot. Each command writes into
its own folder, ``./ekfac-laplace-results/<command>/<dataset>`` unless ``--out``
says otherwise. Run ``ekfac-laplace <command> --help`` for the options.

Exit status: 0 on success (failed candidates are listed at the end), 1 when
``compare`` was asked for Laplace candidates and none succeeded, 2 for bad arguments.
The command shows one progress bar, over its steps (the MAP training, then each
candidate), and only when both standard output and standard error are terminals;
everything inside runs without progress bars.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import torch
from laplace.baselaplace import BaseLaplace
from torch import nn
from tqdm import tqdm

from ekfac_laplace import __version__
from ekfac_laplace.evaluation.candidates import (
    DEFAULT_CANDIDATES,
    STRUCTURES,
    Candidate,
)
from ekfac_laplace.evaluation.comparison import (
    PRIOR_TUNINGS,
    EvaluationSettings,
    compare,
    residual_noise_scale,
    tune_prior,
)
from ekfac_laplace.evaluation.metrics import Predictions
from ekfac_laplace.evaluation.problems import DATASETS, Problem, load_problem
from ekfac_laplace.evaluation.report import SELECTION_CRITERIA, Comparison
from ekfac_laplace.evaluation.sampling import SampleCheck

#: The parent of the default output folders, ``<DEFAULT_OUT>/<command>/<dataset>``.
DEFAULT_OUT = "ekfac-laplace-results"
#: How long the default ``compare`` takes (measured: 16-17 s on 2 CPU cores).
COMPARE_DURATION = "about 20 seconds on 2 CPU cores"
#: Exit status of ``compare`` when every Laplace candidate failed.
EXIT_NO_LAPLACE = 1


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
        epilog=(
            "Example: ekfac-laplace compare (writes "
            "./ekfac-laplace-results/compare/digits). "
            "Exit status: 0 success, 1 no Laplace candidate succeeded, 2 bad "
            "arguments."
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_Parser
    )
    commands.required = True
    _add_compare_command(commands, _common_arguments("compare"))
    _add_sample_command(commands, _common_arguments("sample"))
    return parser


def default_out(command: str, dataset: str) -> Path:
    """The default output folder, ``./ekfac-laplace-results/<command>/<dataset>``.

    Each command and data set gets its own folder, so a run never overwrites the
    files of another or leaves them beside its own.

    Args:
        command: ``"compare"`` or ``"sample"``.
        dataset: One of the bundled data sets.

    Returns:
        The folder (relative to the working directory).
    """
    return Path(DEFAULT_OUT) / command / dataset


def _common_arguments(command: str) -> argparse.ArgumentParser:
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
        help=f"output folder (default: ./{default_out(command, '<dataset>')})",
    )
    output.add_argument("--no-plots", action="store_true", help="skip the figures")
    output.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar, only the results (the bar is off anyway when the "
        "output is not a terminal)",
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
            "OOD detection and robustness to shift (classification), or NLL, RMSE "
            "and interval coverage (regression). Writes results.json, results.csv, "
            "results.md and plots to --out. The defaults take "
            f"{COMPARE_DURATION}. Exits with status 1 if no Laplace candidate "
            "succeeds; failed candidates are listed with their reasons at the end."
        ),
    )
    compare.add_argument(
        "--candidates",
        nargs="+",
        default=list(DEFAULT_CANDIDATES),
        metavar="SPEC",
        help=f"'map' or '<ll|all>_<{'|'.join(STRUCTURES)}>[:<ggn|mc|ef>]', "
        f"e.g. all_ekfac ll_kron:mc (default: {' '.join(DEFAULT_CANDIDATES)})",
    )
    _add_laplace_options(
        compare,
        PRIOR_TUNINGS,
        n_samples_help="samples of the nn and mc predictives (100)",
    )
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
        help="draw EKFAC posterior samples and check them against the posterior",
        description=(
            "Train the MAP network, fit EKFAC Laplace, tune the prior, draw posterior "
            "samples theta = theta* + Q diag((lambda+delta)^-1/2) z, and show that "
            "their means and variances agree with the analytic posterior up to "
            "Monte-Carlo noise; then compare the linearised (GLM) predictive with "
            "the predictive of the sampled networks. Writes samples.json, "
            "samples.png and (with --save-samples) the samples themselves."
        ),
    )
    sample.add_argument(
        "--subset",
        choices=("all", "last_layer"),
        default="all",
        help="weights treated as random (default: all)",
    )
    _add_laplace_options(
        sample,
        ("marglik", "none"),
        n_samples_help="posterior samples to draw; also the samples of the "
        "sampled-network predictive (100)",
    )
    sample.add_argument(
        "--save-samples",
        action="store_true",
        help="also write the samples (n_samples x n_params) to samples.pt",
    )
    sample.set_defaults(handler=run_sample)


def _add_laplace_options(
    parser: argparse.ArgumentParser, tunings: Sequence[str], *, n_samples_help: str
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
        help=n_samples_help,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ekfac-laplace`` command.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when ``None``.

    Returns:
        The exit status: 0 on success, 1 when ``compare`` has no successful Laplace
        candidate, 2 for bad arguments.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_arguments(args)
        return args.handler(args)
    except UsageError as error:
        print(f"ekfac-laplace {args.command}: error: {error}", file=sys.stderr)
        return 2


def show_progress(args: argparse.Namespace) -> bool:
    """Whether the command shows its progress bar.

    Only without ``--quiet`` and when both standard output and standard error are
    terminals: in a log file or a pipe a progress bar is a trail of escape codes.

    Args:
        args: Parsed arguments.

    Returns:
        Whether to show the bar.
    """
    streams = (sys.stdout, sys.stderr)
    return not args.quiet and all(
        callable(getattr(stream, "isatty", None)) and stream.isatty()
        for stream in streams
    )


def _progress_bar(args: argparse.Namespace, total: int) -> tqdm:
    """The command's one progress bar, with ``total`` steps."""
    return tqdm(
        total=total,
        desc=f"ekfac-laplace {args.command}",
        unit="step",
        file=sys.stderr,
        leave=False,
        disable=not show_progress(args),
    )


@contextmanager
def _step(bar: tqdm, label: str) -> Iterator[None]:
    """Name the step running in the progress bar; count it when it is done."""
    bar.set_description_str(label)
    yield
    bar.update()


def run_compare(args: argparse.Namespace) -> int:
    """``ekfac-laplace compare``: fit, evaluate and report every candidate.

    Args:
        args: Parsed arguments.

    Returns:
        Exit status 0, or 1 when Laplace candidates were asked for and none of
        them succeeded.
    """
    from ekfac_laplace.evaluation.figures import write_comparison_plots

    n_steps = len(args.candidates) + (args.checkpoint is None) + (not args.no_plots)
    with _progress_bar(args, n_steps) as bar:
        problem, model = _problem_and_model(args, bar)
        settings = EvaluationSettings(
            prior_tuning=args.prior_tuning,
            prior_structure=args.prior_structure,
            pred_type=args.pred,
            link_approx=args.link,
            n_samples=args.n_samples,
            seed=args.seed,
            progress_bar=False,
            keep_fitted=not args.no_plots and args.dataset in ("moons", "toy1d"),
        )
        started = time.perf_counter()
        comparison = _compare_each(args, problem, model, settings, bar)
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
            with _step(bar, "figures"):
                written += write_comparison_plots(comparison, problem, args.out)

    print(f"\n{problem.splits.description}")
    print(comparison.table())
    if selection is not None:
        print(f"\nRecommended ({args.select_by}): {selection.reason}")
    else:
        print(f"\nNo recommendation: {comparison.config['selection']['error']}")
    print("\nWrote " + ", ".join(str(path) for path in written))
    return _report_failures(comparison)


def _compare_each(
    args: argparse.Namespace,
    problem: Problem,
    model: nn.Module,
    settings: EvaluationSettings,
    bar: tqdm,
) -> Comparison:
    """:func:`compare` candidate by candidate, one progress step each.

    :func:`compare` seeds every candidate and restores the model after it, so one
    call per candidate gives the same rows as one call with all of them.
    """
    if problem.likelihood == "regression":
        noise = residual_noise_scale(model, problem.train_loader)
        settings = replace(settings, sigma_noise=noise)
    parts = []
    for spec in args.candidates:
        with _step(bar, f"candidate {spec}"):
            parts.append(
                compare(
                    model,
                    problem.likelihood,
                    problem.train_loader,
                    problem.test_loader,
                    candidates=[spec],
                    val_loader=problem.val_loader,
                    ood_loader=problem.ood_loader,
                    shift_loaders=problem.shift_loaders,
                    settings=settings,
                )
            )
    comparison = parts[0]
    for part in parts[1:]:
        comparison.rows += part.rows
        comparison.predictions.update(part.predictions)
        comparison.fitted.update(part.fitted)
    comparison.config["candidates"] = list(args.candidates)
    return comparison


def _report_failures(comparison: Comparison) -> int:
    """List the failed candidates with their reasons; the exit status of compare."""
    failed = [row for row in comparison.rows if not row.ok]
    laplace = [row for row in comparison.rows if row.subset_of_weights is not None]
    if failed:
        print(f"\nFailed candidates ({len(failed)} of {len(comparison.rows)}):")
        for row in failed:
            print(f"  {row.candidate}: {row.error}")
    if laplace and not any(row.ok for row in laplace):
        print(
            "ekfac-laplace compare: error: no Laplace candidate succeeded (reasons "
            "above); try the default --candidates, or report the error with the "
            "command line that gave it",
            file=sys.stderr,
        )
        return EXIT_NO_LAPLACE
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

    n_steps = 4 + (args.checkpoint is None) + (not args.no_plots)
    with _progress_bar(args, n_steps) as bar:
        problem, model = _problem_and_model(args, bar)
        la = _fitted_ekfac(args, model, problem, bar)
        with _step(bar, f"drawing {args.n_samples} samples"):
            samples = la.sample(
                args.n_samples, generator=torch.Generator().manual_seed(args.seed)
            )
            check = check_samples(la, samples)
        with _step(bar, "test predictives"):
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
            "sample_mean_error_in_std_expected": check.expected_mean_error_in_std,
            "test_metrics": metrics,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        written = [args.out / "samples.json"]
        written[0].write_text(json.dumps(summary, indent=2) + "\n")
        if args.save_samples:
            torch.save(samples, args.out / "samples.pt")
            written.append(args.out / "samples.pt")
        if not args.no_plots:
            with _step(bar, "figure"):
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
    with _step(bar, "fitting EKFAC"):
        la.fit(problem.train_loader, progress_bar=False)
    settings = EvaluationSettings(
        prior_tuning=args.prior_tuning,
        prior_structure=args.prior_structure,
        progress_bar=False,
    )
    with _step(bar, "tuning the prior"):
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


def _problem_and_model(
    args: argparse.Namespace, bar: tqdm
) -> tuple[Problem, nn.Module]:
    """Seed everything, load the data set, train (or load) the MAP network."""
    torch.manual_seed(args.seed)
    problem = load_problem(args.dataset, args.seed, args.batch_size)
    if args.checkpoint is not None:
        return problem, map_model(args, problem)
    with _step(bar, f"training the MAP network ({args.epochs} epochs)"):
        return problem, map_model(args, problem)


def map_model(args: argparse.Namespace, problem: Problem) -> nn.Module:
    """Train the MAP network (without a progress bar), or load ``--checkpoint``.

    Args:
        args: Parsed arguments (model, checkpoint, epochs, seed).
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
        progress_bar=False,
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
    if args.out is None:
        args.out = default_out(args.command, args.dataset)
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
