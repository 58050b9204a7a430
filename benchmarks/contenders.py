"""The EKFAC implementations the peer benchmark compares: how each is called and read.

EKFAC (George et al., 2018) keeps, per layer, the KFAC eigenbasis ``Q = Q_G ⊗ Q_A``
and replaces its eigenvalues by the second moments of the per-example
(pseudo-)gradients in that basis, ``λ = Σ_n Σ_c (Qᵀ g_{n,c})²``. Each
:class:`Contender` says how one library fits it (``prepare``: untimed set-up, and the
fit to time) and how to read each weight's dense ``Q diag(λ) Qᵀ`` back from its
result, in the scale of the summed cross-entropy (laplace-torch's, and ours):

* **ours**: :func:`ekfac_laplace.compute_ekfac` (type-2, Monte-Carlo, empirical).
* **curvlinops**: ``EKFACLinearOperator``, ``compute_kronecker_factors()`` and
  ``compute_eigenvalue_correction()``; read back through its matrix product. Its
  ``FisherType.TYPE2`` is spelt ``"type-2"``.
* **nngeometry**: ``PMatEKFAC`` and its ``update_diag`` (the eigenvalue
  correction); type-2 through ``FIM``, Monte-Carlo through ``FIM_MonteCarlo``,
  empirical through a ``TorchHooksJacobianBackend`` whose function is the log
  likelihood of the true labels. It averages over the examples, factors and
  eigenvalues alike: ``× N``. ``FIM``'s ``classif_logits`` is the type-2 GGN
  through an exact ``C−1``-column root of the softmax Hessian (Tanabe and Sagae,
  1992) built with torch's *default* dtype (a triangular matrix, ``finfo().eps``):
  it runs with the default dtype set to the model's (else float64 fails with a
  dtype mismatch). Its ``Conv2d`` factors are KFAC-expand, ``G`` divided by the
  number of positions (a scalar: the eigenbasis is unchanged).
* **kronfluence**: ``Analyzer.fit_all_factors`` with ``strategy="ekfac"``. The
  curvature is the task's loss: Monte-Carlo labels drawn by the task
  (``sample=True``) or the true ones (``use_empirical_fisher=True``); no type-2. It
  stores the covariances and ``λ`` as sums with counts beside them and normalises
  only the covariances (eigenbasis unchanged): ``λ`` is the sum over the examples
  of the per-example gradients of the task's loss, so the task returns the
  *summed* loss (a mean would scale each batch by ``1/B²``). Its factor dtypes
  default to float32; a float64 problem asks for float64. ``Conv2d``: expand. Each
  fit calls ``gc.collect()`` six times (``_reset_memory``): about 0.1–0.2 s each,
  growing with the live Python objects of the process.
* nngeometry and kronfluence put a bias into the weight's block (homogeneous
  coordinates), ours and curvlinops keep it apart: the agreement models are
  bias-free (the timing models have biases, each library treating them its way).
* Monte-Carlo labels: ours and curvlinops seed a generator at every pass and draw
  ``softmax(f).multinomial(1)`` per batch. kronfluence's task replays that sampler
  (:class:`LabelReplay`); nngeometry's ``FIM_MonteCarlo`` draws from torch's global
  generator, seeded the same way before each of its passes (the loader has its own
  generator, so iterating it draws nothing from the global one). Every contender
  then sees the same labels.

Only the peers' public functions, methods and attributes are used.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
import logging
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ekfac_laplace.options import DEFAULT_SEED

CURVATURES = ("type2", "mc", "empirical")
#: Seed of the Monte-Carlo labels (ours' default, and curvlinops').
SEED = DEFAULT_SEED


@dataclass
class Problem:
    """A model and its training data, given alike to every implementation.

    Attributes:
        model: The network (classification logits).
        inputs: Inputs, shape ``(N, ...)``.
        targets: Class labels, shape ``(N,)``.
        batch_size: Examples per batch.
    """

    model: nn.Module
    inputs: Tensor
    targets: Tensor
    batch_size: int

    @property
    def num_data(self) -> int:
        """Number of examples ``N``."""
        return len(self.inputs)

    @property
    def num_batches(self) -> int:
        """Batches per pass over the data."""
        return math.ceil(self.num_data / self.batch_size)

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype."""
        return next(self.model.parameters()).dtype

    def dataset(self) -> TensorDataset:
        """The examples as a data set (kronfluence batches it itself)."""
        return TensorDataset(self.inputs, self.targets)

    def loader(self) -> DataLoader:
        """An unshuffled loader with its own generator (draws nothing global)."""
        return DataLoader(
            self.dataset(), batch_size=self.batch_size, generator=torch.Generator()
        )


class LabelReplay:
    """Monte-Carlo labels drawn as ours and curvlinops draw them.

    A generator seeded with ``seed`` at the start of every pass over the data draws
    ``softmax(f).multinomial(1)`` for each batch.

    Args:
        seed: The seed.
        batches_per_pass: Batches in one pass (the generator is re-seeded after).
    """

    def __init__(self, seed: int, batches_per_pass: int) -> None:
        self.seed = seed
        self.batches_per_pass = batches_per_pass
        self.generator = torch.Generator()
        self.calls = 0

    def draw(self, logits: Tensor) -> Tensor:
        """Labels for one batch.

        Args:
            logits: Shape ``(B, C)``.

        Returns:
            Labels, shape ``(B,)``.
        """
        if self.calls % self.batches_per_pass == 0:
            self.generator.manual_seed(self.seed)
        self.calls += 1
        probabilities = logits.detach().softmax(dim=1)
        return probabilities.multinomial(1, generator=self.generator).squeeze(1)


def eigenbasis_matrix(q_g: Tensor, q_a: Tensor, eigenvalues: Tensor) -> Tensor:
    """The dense ``(Q_G ⊗ Q_A) diag(vec λ) (Q_G ⊗ Q_A)ᵀ`` of one weight.

    Args:
        q_g: Output-side eigenvectors, shape ``(out, out)``.
        q_a: Input-side eigenvectors, shape ``(in, in)``.
        eigenvalues: Shape ``(out, in)``; ``vec`` is row-major, as a weight
            ``(out, in)`` (``Conv2d``: ``in = c_in·kh·kw``) flattens.

    Returns:
        Shape ``(out·in, out·in)``.

    Raises:
        ValueError: If the shapes do not fit together.
    """
    if tuple(eigenvalues.shape) != (q_g.shape[0], q_a.shape[0]):
        raise ValueError(
            f"Eigenvalues of shape {tuple(eigenvalues.shape)} do not fit eigenbases "
            f"of sizes {q_g.shape[0]} and {q_a.shape[0]}."
        )
    basis = torch.kron(q_g, q_a)
    return (basis * eigenvalues.reshape(1, -1)) @ basis.T


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``Linear`` / ``Conv2d`` layers of a bias-free model, in parameter order.

    Args:
        model: The network.

    Returns:
        ``(name, module)`` pairs.

    Raises:
        ValueError: If a layer has a bias or another module has parameters.
    """
    layers = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or module.bias is not None:
            raise ValueError(
                f"The agreement check takes bias-free Linear / Conv2d layers only, got "
                f"'{name}': {module}."
            )
        layers.append((name, module))
    return layers


def blocks_of(matrix: Tensor, model: nn.Module) -> list[Tensor]:
    """The diagonal blocks of a dense matrix over the parameters, one per weight.

    Args:
        matrix: Shape ``(P, P)``, parameters in ``model.parameters()`` order.
        model: The network.

    Returns:
        The blocks.
    """
    blocks, start = [], 0
    for _, module in weight_layers(model):
        size = module.weight.numel()
        blocks.append(matrix[start : start + size, start : start + size])
        start += size
    return blocks


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Set torch's default dtype inside the block (nngeometry builds with it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# --- ours -------------------------------------------------------------------------


def prepare_ours(
    problem: Problem, curvature: str, stack: ExitStack
) -> Callable[[], Any]:
    """:func:`ekfac_laplace.compute_ekfac` over the problem's loader."""
    from ekfac_laplace import EKFACOptions, compute_ekfac
    from ekfac_laplace.batches import LaplaceBatches

    params = [p for p in problem.model.parameters() if p.requires_grad]
    options = EKFACOptions(fisher_type=curvature, seed=SEED)

    def fit() -> Any:
        batches = LaplaceBatches(problem.loader())
        return compute_ekfac(
            problem.model, params, batches, "classification", problem.num_data, options
        )

    return fit


def dense_ours(factors: Any, problem: Problem) -> list[Tensor]:
    """Each weight's ``Q diag(λ) Qᵀ`` from our ``EKFACFactors`` (summed loss)."""
    # layout.weight_block: (Q_G, Q_A) and λ of shape (out, in) for Linear / Conv2d
    # weights (only GPT-2's Conv1D is stored transposed).
    return [
        eigenbasis_matrix(*basis, values)
        for basis, values in zip(factors.eigenvectors, factors.eigenvalues)
    ]


# --- curvlinops ---------------------------------------------------------------------


def prepare_curvlinops(
    problem: Problem, curvature: str, stack: ExitStack
) -> Callable[[], Any]:
    """The fit with curvlinops' ``EKFACLinearOperator``: its two passes."""
    from curvlinops import EKFACLinearOperator, FisherType

    params = [p for p in problem.model.parameters() if p.requires_grad]
    fisher_type = {
        "type2": FisherType.TYPE2,
        "mc": FisherType.MC,
        "empirical": FisherType.EMPIRICAL,
    }[curvature]

    def fit() -> Any:
        operator = EKFACLinearOperator(
            problem.model,
            nn.CrossEntropyLoss(reduction="sum"),
            params,
            problem.loader(),
            check_deterministic=False,  # else: extra passes at construction
            seed=SEED,
            fisher_type=fisher_type,
            num_per_example_loss_terms=1,  # else: a pass to infer it
            num_data=problem.num_data,  # else: a pass to count
        )
        operator.compute_kronecker_factors()
        operator.compute_eigenvalue_correction()
        return operator

    return fit


def dense_curvlinops(operator: Any, problem: Problem) -> list[Tensor]:
    """The operator's diagonal blocks, by multiplying it with the identity."""
    size = sum(p.numel() for p in problem.model.parameters())
    identity = torch.eye(size, dtype=problem.dtype)
    return blocks_of(operator @ identity, problem.model)


# --- nngeometry ---------------------------------------------------------------------


def _log_likelihood(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """Per-example log likelihood of the true labels, shape ``(B, 1)``."""
    logits = model(inputs)
    return -nn.functional.cross_entropy(logits, targets, reduction="none")[:, None]


def prepare_nngeometry(
    problem: Problem, curvature: str, stack: ExitStack
) -> Callable[[], Any]:
    """The fit with nngeometry's ``PMatEKFAC`` and its ``update_diag``."""
    from nngeometry.backend import TorchHooksJacobianBackend
    from nngeometry.metrics import FIM, FIM_MonteCarlo
    from nngeometry.object import PMatEKFAC

    model = problem.model

    def fit() -> Any:
        loader = problem.loader()
        with default_dtype(problem.dtype), torch.random.fork_rng(devices=[]):
            if curvature == "type2":
                ekfac = FIM(model, loader, PMatEKFAC, variant="classif_logits")
            elif curvature == "mc":
                torch.manual_seed(SEED)  # FIM_MonteCarlo samples from the global RNG
                ekfac = FIM_MonteCarlo(model, loader, PMatEKFAC)
                torch.manual_seed(SEED)
            else:
                function = functools.partial(_log_likelihood, model)
                backend = TorchHooksJacobianBackend(model=model, function=function)
                ekfac = PMatEKFAC(generator=backend, examples=loader)
            ekfac.update_diag(loader)  # the eigenvalue correction
        return ekfac

    return fit


def dense_nngeometry(ekfac: Any, problem: Problem) -> list[Tensor]:
    """``PMatEKFAC.to_torch()``'s diagonal blocks, times ``N``."""
    layers = ekfac.generator.layer_collection.layers
    names = [name for name, _ in weight_layers(problem.model)]
    if list(layers) != names:
        raise ValueError(f"nngeometry's layers {list(layers)} are not {names}.")
    # A mean over the examples: × N for the summed loss.
    return [
        block * problem.num_data for block in blocks_of(ekfac.to_torch(), problem.model)
    ]


# --- kronfluence --------------------------------------------------------------------


def kronfluence_task(problem: Problem) -> Any:
    """A kronfluence ``Task``: summed cross-entropy, replayed Monte-Carlo labels.

    Args:
        problem: The problem (its number of batches per pass).

    Returns:
        The task.
    """
    from kronfluence.task import Task

    class ClassificationTask(Task):
        """Summed cross-entropy; ``sample=True`` draws the labels from the model."""

        def __init__(self) -> None:
            self.labels = LabelReplay(SEED, problem.num_batches)

        def compute_train_loss(
            self, batch: Any, model: nn.Module, sample: bool = False
        ) -> Tensor:
            """The summed loss of a batch (true or sampled labels)."""
            inputs, targets = batch
            logits = model(inputs)
            if sample:
                targets = self.labels.draw(logits)
            return nn.functional.cross_entropy(logits, targets, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            """Not used by the factors."""
            return self.compute_train_loss(batch, model)

    return ClassificationTask()


def prepare_kronfluence(
    problem: Problem, curvature: str, stack: ExitStack
) -> Callable[[], Any]:
    """The fit with kronfluence's ``Analyzer`` (a model copy, a temp directory)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments

    task = kronfluence_task(problem)
    # prepare_model wraps the layers and freezes the parameters: work on a copy.
    model = prepare_model(copy.deepcopy(problem.model), task)
    directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="peers-"))
    analyzer = Analyzer(
        "peers",
        model,
        task,
        cpu=True,
        disable_tqdm=True,
        output_dir=directory,
        log_level=logging.WARNING,
    )
    dtype = problem.dtype
    arguments = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=curvature == "empirical",
        covariance_max_examples=None,
        lambda_max_examples=None,
        activation_covariance_dtype=dtype,
        gradient_covariance_dtype=dtype,
        per_sample_gradient_dtype=dtype,
        lambda_dtype=dtype,
    )

    def fit() -> Any:
        with warnings.catch_warnings():
            # torch's deprecation of torch.cuda.amp.GradScaler, which it builds.
            warnings.simplefilter("ignore", FutureWarning)
            analyzer.fit_all_factors(
                "ekfac",
                problem.dataset(),
                per_device_batch_size=problem.batch_size,
                factor_args=arguments,
                overwrite_output_dir=True,
            )
        return analyzer

    return fit


def dense_kronfluence(analyzer: Any, problem: Problem) -> list[Tensor]:
    """Each weight's ``Q diag(λ) Qᵀ`` from kronfluence's saved factors."""
    eigen = analyzer.load_eigendecomposition("ekfac")
    lambdas = analyzer.load_lambda_matrices("ekfac")
    blocks = []
    for name, _ in weight_layers(problem.model):
        if int(lambdas["num_lambda_processed"][name]) != problem.num_data:
            raise ValueError(f"kronfluence's λ of '{name}' is not over every example.")
        blocks.append(
            eigenbasis_matrix(
                eigen["gradient_eigenvectors"][name],
                eigen["activation_eigenvectors"][name],
                lambdas["lambda_matrix"][name],  # a sum, as ours
            )
        )
    return blocks


# --- the contenders -----------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    """An EKFAC implementation.

    Attributes:
        package: Its import name.
        distribution: Its name on PyPI (for the version).
        curvatures: The curvatures it computes.
        prepare: ``(problem, curvature, stack) -> fit``: untimed set-up (cleaned up
            by ``stack``) and the fit to time.
        dense: ``(fitted, problem) -> blocks``: each weight's dense EKFAC, in the
            scale of the summed loss.
    """

    package: str
    distribution: str
    curvatures: tuple[str, ...]
    prepare: Callable[[Problem, str, ExitStack], Callable[[], Any]]
    dense: Callable[[Any, Problem], list[Tensor]]

    @property
    def installed(self) -> bool:
        """Whether it can be imported."""
        return importlib.util.find_spec(self.package) is not None

    @property
    def version(self) -> str | None:
        """Its installed version."""
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None


CONTENDERS: dict[str, Contender] = {
    "ours": Contender(
        "ekfac_laplace", "ekfac-laplace", CURVATURES, prepare_ours, dense_ours
    ),
    "curvlinops": Contender(
        "curvlinops",
        "curvlinops-for-pytorch",
        CURVATURES,
        prepare_curvlinops,
        dense_curvlinops,
    ),
    "nngeometry": Contender(
        "nngeometry", "nngeometry", CURVATURES, prepare_nngeometry, dense_nngeometry
    ),
    "kronfluence": Contender(
        "kronfluence",
        "kronfluence",
        ("mc", "empirical"),
        prepare_kronfluence,
        dense_kronfluence,
    ),
}
PEERS = tuple(name for name in CONTENDERS if name != "ours")


def fit_dense(name: str, problem: Problem, curvature: str) -> list[Tensor]:
    """Fit one contender and return its dense blocks.

    Args:
        name: The contender.
        problem: Model and data.
        curvature: ``"type2"``, ``"mc"`` or ``"empirical"``.

    Returns:
        Each weight's dense EKFAC, in the scale of the summed loss.
    """
    contender = CONTENDERS[name]
    with ExitStack() as stack:
        fitted = contender.prepare(problem, curvature, stack)()
        return contender.dense(fitted, problem)
