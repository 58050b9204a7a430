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
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import DataLoader
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
    bar.refresh()  # steps take seconds: show each one done, whatever tqdm's throttle


def problem_and_model(args: argparse.Namespace, bar: tqdm) -> tuple[Problem, nn.Module]:
    """Seed everything, load the data, train (or load, or take) the MAP network.

    The data are a bundled data set (``--dataset``) or the user's file
    (``--data``); the network a reference model or the user's function
    (``--model module:function``), trained for ``--epochs`` unless
    ``--checkpoint`` gives its weights or ``--epochs 0`` takes it as it comes.

    Args:
        args: Parsed arguments (data, seed, batch size, model, checkpoint).
        bar: The command's progress bar; the training is one step of it.

    Returns:
        The problem and the MAP network.

    Raises:
        UsageError: If the data file, the model or ``--checkpoint`` cannot be used.
    """
    torch.manual_seed(args.seed)
    problem = load_data(args)
    if args.checkpoint is not None or args.epochs == 0:
        return problem, map_model(args, problem)
    with step(bar, f"training the MAP network ({args.epochs} epochs)"):
        return problem, map_model(args, problem)


def load_data(args: argparse.Namespace) -> Problem:
    """The bundled data set ``--dataset`` or the user's ``--data`` file.

    Args:
        args: Parsed arguments (``data``, ``dataset``, ``seed``, ``batch_size``).

    Returns:
        The problem.

    Raises:
        UsageError: If the data file cannot be read or is malformed.
    """
    if getattr(args, "data", None) is None:
        return load_problem(args.dataset, args.seed, args.batch_size)
    from ekfac_laplace.evaluation.user_inputs import load_data_file

    try:
        return load_data_file(args.data, seed=args.seed, batch_size=args.batch_size)
    except ValueError as error:
        raise UsageError(f"--data: {error}") from None


def build_network(
    args: argparse.Namespace, problem: Problem, *, seed: int, dropout: float = 0.0
) -> nn.Module:
    """A fresh, seeded network of ``--model`` for the problem.

    Args:
        args: Parsed arguments (``model``, and ``model_function`` for a user's
            ``module:function``).
        problem: The data (input shape, outputs).
        seed: Seed of the initialisation.
        dropout: Dropout rate (MC dropout); a user's function must take it.

    Returns:
        The untrained network.

    Raises:
        UsageError: If the user's function fails or takes no ``dropout``.
    """
    from ekfac_laplace.evaluation.models import build_model

    splits = problem.splits
    function = getattr(args, "model_function", None)
    if function is None:
        try:
            return build_model(
                args.model,
                splits.input_shape,
                splits.n_outputs,
                seed=seed,
                dropout=dropout,
            )
        except ValueError as error:
            raise UsageError(f"--model {args.model}: {error}") from None
    from ekfac_laplace.evaluation.user_inputs import build_user_model

    try:
        return build_user_model(
            function,
            splits.input_shape,
            splits.n_outputs,
            seed=seed,
            dropout=dropout or None,
        )
    except (TypeError, ValueError) as error:
        raise UsageError(f"--model {args.model}: {error}") from None


def map_model(args: argparse.Namespace, problem: Problem) -> nn.Module:
    """Train the MAP network, load ``--checkpoint``, or take it as it comes.

    The training runs without a progress bar; ``--epochs 0`` takes a user's
    network as its function returns it.

    Args:
        args: Parsed arguments (model, checkpoint, epochs, seed).
        problem: The data.

    Returns:
        The network in eval mode.

    Raises:
        UsageError: If the network cannot be built, or the checkpoint cannot be
            read or does not fit the model.
    """
    from ekfac_laplace.evaluation.models import train_map

    splits = problem.splits
    model = build_network(args, problem, seed=args.seed)
    if args.checkpoint is not None:
        try:
            state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as error:  # noqa: BLE001 - any failure: one line, exit 2
            first_line = str(error).strip().split("\n")[0]
            raise UsageError(
                f"cannot load --checkpoint {args.checkpoint} into the {args.model} "
                f"for {problem.name}: {first_line}"
            ) from error
        return model.eval()
    if args.epochs == 0:
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


def peer_trainer(
    args: argparse.Namespace, problem: Problem
) -> Callable[[int, float], nn.Module]:
    """Train one more network like the MAP: the deep ensemble's and MC dropout's.

    Args:
        args: Parsed arguments (model, epochs).
        problem: The data.

    Returns:
        ``train_peer(seed, dropout)``: a network of ``--model`` initialised and
        shuffled with ``seed``, trained for ``--epochs`` with dropout ``dropout``.
    """
    from ekfac_laplace.evaluation.models import train_map

    def train_peer(seed: int, dropout: float) -> nn.Module:
        if args.epochs == 0:
            raise ValueError(
                "--epochs 0 takes the MAP network as it comes, so the extra networks "
                "of an ensemble or MC dropout cannot be trained; give --epochs"
            )
        model = build_network(args, problem, seed=seed, dropout=dropout)
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(
            problem.train_loader.dataset,
            batch_size=problem.train_loader.batch_size,
            shuffle=True,
            generator=generator,
        )
        return train_map(
            model, loader, problem.likelihood, epochs=args.epochs, seed=seed
        )

    return train_peer
