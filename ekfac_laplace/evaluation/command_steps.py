"""What both ``ekfac-laplace`` commands share: progress, data, the MAP network.

Each command shows one progress bar over its steps (:func:`progress_bar`,
:func:`step`), and only on terminals (:func:`show_progress`); each starts from a
bundled data set and the MAP network trained on it, or loaded from ``--checkpoint``
(:func:`problem_and_model`, :func:`map_model`). A bad combination of arguments is a
:class:`UsageError` (exit status 2). The parser and ``compare`` are in
:mod:`~ekfac_laplace.evaluation.cli`, ``sample`` in
:mod:`~ekfac_laplace.evaluation.sample_command`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm import tqdm

from ekfac_laplace.evaluation.problems import Problem, load_problem


class UsageError(ValueError):
    """A bad combination of command-line arguments (exit status 2)."""


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


def progress_bar(args: argparse.Namespace, total: int) -> tqdm:
    """The command's one progress bar, with ``total`` steps.

    Args:
        args: Parsed arguments (``command``, ``quiet``).
        total: Number of steps the command will count.

    Returns:
        The bar, disabled unless :func:`show_progress`.
    """
    return tqdm(
        total=total,
        desc=f"ekfac-laplace {args.command}",
        unit="step",
        file=sys.stderr,
        leave=False,
        disable=not show_progress(args),
    )


@contextmanager
def step(bar: tqdm, label: str) -> Iterator[None]:
    """Name the step running in the progress bar; count it when it is done.

    Args:
        bar: The command's progress bar.
        label: What the step does, shown while it runs.

    Yields:
        Nothing; the step runs in the ``with`` block.
    """
    bar.set_description_str(label)
    yield
    bar.update()


def problem_and_model(args: argparse.Namespace, bar: tqdm) -> tuple[Problem, nn.Module]:
    """Seed everything, load the data set, train (or load) the MAP network.

    Args:
        args: Parsed arguments (data set, seed, batch size, model, checkpoint).
        bar: The command's progress bar; the training is one step of it.

    Returns:
        The problem and the MAP network.

    Raises:
        UsageError: If ``--checkpoint`` cannot be loaded.
    """
    torch.manual_seed(args.seed)
    problem = load_problem(args.dataset, args.seed, args.batch_size)
    if args.checkpoint is not None:
        return problem, map_model(args, problem)
    with step(bar, f"training the MAP network ({args.epochs} epochs)"):
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
        except Exception as error:  # noqa: BLE001 - any failure: one line, exit 2
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
