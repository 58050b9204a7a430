"""The ``ekfac-laplace`` command: compare Laplace approximations, draw samples.

``ekfac-laplace compare`` trains (or loads) a MAP network on a bundled data set, fits
every candidate Laplace approximation around it, prints one table and writes
``results.json``, ``results.csv`` and plots. ``ekfac-laplace sample`` fits EKFAC
Laplace, draws posterior samples in the eigenbasis, checks them against the analytic
posterior and writes their predictive summary and a plot. Each command writes into
its own folder, ``./ekfac-laplace-results/<command>/<dataset>`` unless ``--out``
says otherwise. Run ``ekfac-laplace <command> --help`` for the options.

This module holds the parser, :func:`main` and ``compare``; ``sample`` runs in
:mod:`~ekfac_laplace.evaluation.sample_command`, and what both commands share (the
progress bar, the MAP network, :class:`UsageError`) is in
:mod:`~ekfac_laplace.evaluation.command_steps`.

Exit status: 0 on success (failed candidates are listed at the end), 1 when
``compare`` was asked for Laplace candidates and none succeeded, 2 for bad arguments.
The command shows one progress bar, over its steps (the MAP training, then each
candidate), and only when both standard output and standard error are terminals;
everything inside runs without progress bars.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn
from tqdm import tqdm

from ekfac_laplace import __version__
from ekfac_laplace.evaluation.candidates import (
    DEFAULT_CANDIDATES,
    DEFAULT_LAPLACE,
    STRUCTURES,
    Candidate,
)
from ekfac_laplace.evaluation.command_steps import (
    UsageError,
    peer_trainer,
    problem_and_model,
    progress_bar,
    step,
)
from ekfac_laplace.evaluation.comparison import (
    PRIOR_TUNINGS,
    EvaluationSettings,
    compare,
    residual_noise_scale,
)
from ekfac_laplace.evaluation.models import MODELS
from ekfac_laplace.evaluation.problems import DATASETS, IMAGE_DATASETS, Problem
from ekfac_laplace.evaluation.report import SELECTION_CRITERIA, Comparison
from ekfac_laplace.evaluation.sample_command import run_sample
from ekfac_laplace.evaluation.settings import (
    DEFAULT_SWEEP_GRID,
    DEFAULT_VAL_TOLERANCE,
)

#: The parent of the default output folders, ``<DEFAULT_OUT>/<command>/<dataset>``.
DEFAULT_OUT = "ekfac-laplace-results"
#: How long the default ``compare`` takes (measured: 70 and 92 s on 2 CPU cores).
COMPARE_DURATION = "about 1.5 minutes on 2 CPU cores"
#: Exit status of ``compare`` when every Laplace candidate failed.
EXIT_NO_LAPLACE = 1
#: Which Laplace candidates ``--sweep`` evaluates at every prior of the sweep.
SWEEPS = ("ekfac", "all", "none")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
        help="bundled data set: digits (8x8 images, 10 classes; with rotation/noise "
        "shift and natural-image OOD sets), noisy-digits (300 training digits, 20%% "
        "of the labels in every split replaced: a MAP that is over-confident), "
        "moons (2-D, 2 classes), toy1d (1-D regression with a gap), diabetes "
        "(tabular regression). Default: digits.",
    )
    data.add_argument(
        "--data",
        type=_path,
        metavar="FILE",
        help="your own data instead of --dataset: a file written by "
        "ekfac_laplace.evaluation.user_inputs.save_data_file (torch.save of "
        "{'train': (X, y), 'test': (X, y)} and optionally 'val', 'ood', 'shift')",
    )
    data.add_argument(
        "--model",
        default="mlp",
        metavar="MODEL",
        help="network trained to the MAP: mlp, cnn (image data sets), or your own "
        "'module:function' / 'path/file.py:function' returning an nn.Module (called "
        "with those of input_shape, n_outputs, dropout it takes). Default: mlp.",
    )
    data.add_argument(
        "--checkpoint",
        type=_path,
        help="load the MAP weights from this state_dict file instead of training",
    )
    data.add_argument(
        "--save-checkpoint",
        type=_path,
        help="save the trained MAP weights (a state_dict) to this file",
    )
    data.add_argument(
        "--epochs",
        type=_non_negative_int,
        default=60,
        help="MAP training epochs (60); 0 takes your --model as its function "
        "returns it (already trained)",
    )
    data.add_argument(
        "--batch-size", type=_positive_int, default=64, help="batch size (64)"
    )
    data.add_argument(
        "--seed", type=_seed, default=0, help="seed of everything (0 ... 2**32 - 1)"
    )
    output = common.add_argument_group("output")
    output.add_argument(
        "--out",
        type=_path,
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
        metavar="SPEC",
        help=f"'map'; a peer: 'map_ts' (temperature scaling), 'ensemble<M>' (a deep "
        "ensemble of M networks), 'mc_dropout[:<p>]'; or Laplace "
        f"'<ll|all>_<{'|'.join(STRUCTURES)}>[:<ggn|mc|ef>][@<prior tuning>]', EKFAC "
        "also with '+exact<n>' (exact blocks up to n entries) and '+lr<k>' (a "
        "rank-k correction), e.g. all_ekfac ll_kron:mc all_ekfac@marglik "
        "all_ekfac+exact500+lr8 ensemble5 (default: map map_ts and each of "
        f"{' '.join(DEFAULT_LAPLACE)} at the --prior-tuning prior and at the "
        "marginal-likelihood prior, '@marglik')",
    )
    _add_laplace_options(
        compare,
        PRIOR_TUNINGS,
        n_samples_help="samples of the nn and mc predictives (100)",
    )
    compare.add_argument(
        "--val-tolerance",
        type=_non_negative_float,
        default=DEFAULT_VAL_TOLERANCE,
        metavar="TAU",
        help="the validation rule's tolerance: the widest prior whose validation NLL "
        "is within TAU nats per example of the best (default "
        f"{DEFAULT_VAL_TOLERANCE})",
    )
    compare.add_argument(
        "--sweep",
        choices=SWEEPS,
        default="ekfac",
        help="evaluate Laplace candidates at every prior of a grid (1e-3 ... 1e4) "
        "and plot the trade-off between in-distribution and shift / OOD metrics: "
        "ekfac candidates only (default; our Jacobian-free predictive makes each "
        "prior cheap), all (laplace-torch's KFAC / diag / full predictives take "
        "seconds per prior) or none",
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
    default = tunings[0]
    texts = {
        "validation": "the widest prior within --val-tolerance of the best "
        "validation NLL (validation)",
        "marglik": "marginal likelihood (marglik)",
        "gridsearch": "the best validation NLL (gridsearch)",
        "none": "not at all (none)",
    }
    parser.add_argument(
        "--prior-tuning",
        choices=tunings,
        default=default,
        help="tune the prior precision by "
        + ", ".join(texts[t] + (", default" if t == default else "") for t in tunings),
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


def run_compare(args: argparse.Namespace) -> int:
    """``ekfac-laplace compare``: fit, evaluate and report every candidate.

    Args:
        args: Parsed arguments.

    Returns:
        Exit status 0, or 1 when Laplace candidates were asked for and none of
        them succeeded.
    """
    from ekfac_laplace.evaluation.figures import write_comparison_plots

    trains = args.checkpoint is None and args.epochs > 0
    n_steps = len(args.candidates) + trains + (not args.no_plots)
    with progress_bar(args, n_steps) as bar:
        problem, model = problem_and_model(args, bar)
        swept = [
            candidate.fit_name
            for candidate in map(Candidate.parse, args.candidates)
            if candidate.is_laplace
            and (
                args.sweep == "all"
                or (args.sweep == "ekfac" and candidate.hessian_structure == "ekfac")
            )
        ]
        settings = EvaluationSettings(
            prior_tuning=args.prior_tuning,
            prior_structure=args.prior_structure,
            val_tolerance=args.val_tolerance,
            sweep_grid=DEFAULT_SWEEP_GRID if swept else (),
            sweep_candidates=swept,
            pred_type=args.pred,
            link_approx=args.link,
            n_samples=args.n_samples,
            seed=args.seed,
            progress_bar=False,
            keep_fitted=not args.no_plots and problem.name in ("moons", "toy1d"),
        )
        started = time.perf_counter()
        comparison = _compare_each(args, problem, model, settings, bar)
        comparison.config.update(
            dataset=problem.name,
            data_file=None if args.data is None else str(args.data),
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
            with step(bar, "figures"):
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
    call per candidate gives the same rows as one call with all of them; candidates
    that share a fit (``all_ekfac`` and ``all_ekfac@marglik``) go in one call, so
    they share it here too.
    """
    if problem.likelihood == "regression":
        noise = residual_noise_scale(model, problem.train_loader)
        settings = replace(settings, sigma_noise=noise)
    train_peer = peer_trainer(args, problem)
    groups: dict[str, list[str]] = {}
    for spec in args.candidates:
        groups.setdefault(Candidate.parse(spec).fit_name, []).append(spec)
    parts = []
    for specs in groups.values():
        with step(bar, f"candidate {' and '.join(specs)}"):
            parts.append(
                compare(
                    model,
                    problem.likelihood,
                    problem.train_loader,
                    problem.test_loader,
                    candidates=specs,
                    val_loader=problem.val_loader,
                    ood_loader=problem.ood_loader,
                    shift_loaders=problem.shift_loaders,
                    settings=settings,
                    train_peer=train_peer,
                )
            )
        if len(specs) > 1:
            bar.update(len(specs) - 1)
            bar.refresh()
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


def _check_arguments(args: argparse.Namespace) -> None:
    _check_data_and_model(args)
    if args.model == "cnn" and args.data is None and args.dataset not in IMAGE_DATASETS:
        raise UsageError(
            f"--model cnn needs an image data set; {args.dataset} has vector inputs "
            "(use --model mlp or --dataset digits)"
        )
    if args.checkpoint is not None:
        _check_checkpoint(args.checkpoint)
    if args.save_checkpoint is not None:
        _check_writable(args.save_checkpoint, "--save-checkpoint", folder=False)
    if args.command == "sample" and args.n_samples < 2:
        raise UsageError(
            f"--n-samples {args.n_samples}: the sample command compares the "
            "samples' variances with the posterior's, which needs at least 2"
        )
    if args.command == "compare":
        if args.candidates is None:
            args.candidates = [
                c
                for c in DEFAULT_CANDIDATES
                if not (args.prior_tuning == "marglik" and c.endswith("@marglik"))
            ]
        try:
            for spec in args.candidates:
                Candidate.parse(spec)
        except ValueError as error:
            raise UsageError(str(error)) from error
        if len(set(args.candidates)) != len(args.candidates):
            raise UsageError(f"--candidates lists a candidate twice: {args.candidates}")
        if args.prior_tuning in ("validation", "gridsearch") and (
            args.prior_structure != "scalar"
        ):
            raise UsageError(
                f"--prior-tuning {args.prior_tuning} tunes a scalar prior; drop "
                "--prior-structure layerwise or use --prior-tuning marglik"
            )
    if args.out is None:
        name = args.dataset if args.data is None else args.data.stem
        args.out = default_out(args.command, name)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder")
    _check_writable(args.out, "--out", folder=True)


def _check_data_and_model(args: argparse.Namespace) -> None:
    """Resolve ``--dataset`` / ``--data`` and ``--model``; refuse what cannot run."""
    if args.data is not None and args.dataset is not None:
        raise UsageError(
            "--data and --dataset both name the data; give one (--data for your "
            "own file, --dataset for a bundled set)"
        )
    if args.data is None and args.dataset is None:
        args.dataset = "digits"
    if args.data is not None and not args.data.is_file():
        raise UsageError(f"--data {args.data} is not a file")
    args.model_function = None
    if args.model not in MODELS:
        if ":" not in args.model:
            raise UsageError(
                f"--model {args.model!r} is neither a reference model "
                f"({', '.join(MODELS)}) nor your own 'module:function' / "
                "'path/file.py:function'"
            )
        from ekfac_laplace.evaluation.user_inputs import load_model_function

        try:
            args.model_function = load_model_function(args.model)
        except ValueError as error:
            raise UsageError(f"--model {args.model}: {error}") from None
    elif args.epochs == 0 and args.checkpoint is None:
        raise UsageError(
            f"--epochs 0 would evaluate an untrained {args.model}: train it (--epochs "
            "> 0), load its weights (--checkpoint), or pass your own trained network "
            "(--model module:function)"
        )


def _check_checkpoint(path: Path) -> None:
    """Refuse a --checkpoint that is not a file torch reads as plain tensors."""
    if not path.is_file():
        raise UsageError(f"--checkpoint {path} is not a file")
    try:
        with warnings.catch_warnings():  # torch's notes on foreign pickles
            warnings.simplefilter("ignore")
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure: one line, exit 2
        raise UsageError(
            f"--checkpoint {path} is not a state_dict of tensors that torch.load(..., "
            f"weights_only=True) reads ({type(error).__name__}); pass a file written "
            "by --save-checkpoint"
        ) from None


def _check_writable(path: Path, option: str, folder: bool) -> None:
    """Make sure ``path`` (a folder, or a file's folder) can be written, now.

    Found only after the training, an unwritable output would lose the results.
    """
    if not folder and path.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name")
    target = path if folder else path.parent
    blocking = next((p for p in (target, *target.parents) if p.is_file()), None)
    if blocking is not None:
        raise UsageError(f"{option} {path}: {blocking} is a file, not a folder")
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as error:
        raise UsageError(
            f"{option} {path} cannot be written ({error.strerror or error}); "
            "choose a writable location"
        ) from None


def _path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(text)


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(
            f"expected a seed from 0 to 2**32 - 1 (numpy's range), got {value}"
        )
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected a non-negative finite number, got {value}"
        )
    return value


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum``, called ``what``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a {what} integer, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")


if __name__ == "__main__":
    sys.exit(main())
