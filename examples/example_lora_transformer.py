"""Laplace-LoRA with EKFAC: a small LLaMA classifier's LoRA adapters, calibrated.

A LLaMA-style sequence classifier (``transformers.LlamaForSequenceClassification``
built from a config: random init, nothing downloaded; 2 layers of width 32 by
default) reads token sequences of 8 to 24 tokens with right padding and an
``attention_mask``. Its label is the keyword group with the most keywords in the
sequence; 15% of the labels are replaced by another class (label noise), so that a
network that fits its training set is overconfident. The whole network is first
trained as the "base" on a related task with clean labels (two keywords per group);
peft's LoRA adapters on ``q_proj`` / ``v_proj`` and a trainable copy of the head
``score`` are then fine-tuned with Adam on the target task (a third keyword per
group, a token the base task treats as filler; label noise): the MAP. With only the
adapters and the head trainable, the script fits laplace-torch's KFAC
(``hessian_structure="kron"``), EKFAC (``"ekfac"``) and a last-layer EKFAC on the
head, tunes each prior precision by marginal likelihood and evaluates the probit GLM
predictive on a test set and on a shifted test set (sequences of 16 to 48 tokens
with as many keywords). It prints each method's cost (fit and prior tuning time,
prediction time over both test sets, growth of resident memory during the fit)
and its accuracy, NLL and ECE on both sets; ``reliability.png`` shows reliability
diagrams and confidence histograms on the test set.

Run: ``python examples/example_lora_transformer.py [--out DIR]`` (about 30 seconds
on 2 CPU cores; figures go to ``example-output/lora_transformer/`` in the current
folder).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

# First: registers hessian_structure="ekfac", and hides the deprecation notice that
# laplace-torch's import of asdl triggers in torch (not actionable here).
import ekfac_laplace  # noqa: F401

# isort: split
import peft
import torch
import transformers
from laplace import Laplace
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ekfac_laplace.evaluation import classification_metrics, plotting, predict
from ekfac_laplace.evaluation.memory import PeakMemory

# laplace-torch reminds on every prior tuning that the default link is probit, even
# when link_approx is passed; we pass it.
warnings.filterwarnings("ignore", message="By default `link_approx` is `probit`")
# peft calls a transformers method that transformers 5 has renamed (not actionable).
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")

PAD = 0
VOCABULARY = 64
CLASSES = 4
#: Keyword tokens of each class: the base task knows the first two of each group,
#: the target task adds a third (a token the base model saw only as filler).
BASE_KEYWORDS = tuple((1 + 2 * c, 2 + 2 * c) for c in range(CLASSES))
TARGET_KEYWORDS = tuple((*group, 9 + c) for c, group in enumerate(BASE_KEYWORDS))
FILLER = tuple(range(9, VOCABULARY))  # the target task's new keywords among them
LENGTHS, SHIFTED_LENGTHS = (8, 24), (16, 48)  # tokens per sequence (inclusive)
N_KEYWORDS = (3, 7)  # keywords per sequence (inclusive)
CANDIDATES = (
    # name, subset_of_weights, hessian_structure
    ("LoRA-KFAC", "all", "kron"),
    ("LoRA-EKFAC", "all", "ekfac"),
    ("LL-EKFAC", "last_layer", "ekfac"),
)
COLUMNS = ("accuracy", "nll", "ece")
#: Batch size for laplace-torch's KFAC predictive: its Jacobians (torch.func.jacrev)
#: cost B·C backward passes of the whole batch, so their cost per example grows with B.
JACOBIAN_BATCH = 5


class Tokens(Dataset):
    """Dict examples ``{"input_ids", "attention_mask", "labels"}`` (Hugging Face)."""

    def __init__(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor):
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }


def _draw(
    m: int,
    keywords: Tensor,
    filler: Tensor,
    lengths: tuple[int, int],
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """``m`` padded sequences and the keyword count of each group, ``(m, classes)``."""
    max_length = lengths[1]
    length = torch.randint(lengths[0], max_length + 1, (m, 1), generator=generator)
    is_token = torch.arange(max_length) < length
    tokens = filler[torch.randint(len(filler), (m, max_length), generator=generator)]
    # The keywords sit at the first n_keywords positions of a random order of the
    # sequence's tokens (padding last).
    order = torch.rand(m, max_length, generator=generator).masked_fill(~is_token, 2.0)
    n_keywords = torch.randint(
        N_KEYWORDS[0], N_KEYWORDS[1] + 1, (m, 1), generator=generator
    )
    is_keyword = order.argsort(1).argsort(1) < n_keywords
    group = torch.randint(CLASSES, (m, max_length), generator=generator)
    member = torch.randint(keywords.shape[1], (m, max_length), generator=generator)
    tokens = torch.where(is_keyword, keywords[group, member], tokens)
    counts = (nn.functional.one_hot(group, CLASSES) * is_keyword[..., None]).sum(1)
    return tokens * is_token, counts


def keyword_task(
    n: int,
    keywords: tuple[tuple[int, ...], ...],
    *,
    label_noise: float,
    generator: torch.Generator,
    lengths: tuple[int, int] = LENGTHS,
) -> Tokens:
    """Filler tokens and keywords; the label is the group with the most keywords.

    Each sequence has a length drawn from ``lengths`` (inclusive), right padding to
    the longest, and ``N_KEYWORDS`` (inclusive range) keywords of random groups at
    random positions; sequences whose most frequent group is tied are redrawn. A
    share ``label_noise`` of the labels is replaced by a random other class.
    """
    groups = torch.tensor(keywords)  # (classes, keywords per group)
    filler = torch.tensor([t for t in FILLER if t not in groups])
    input_ids, labels = [], []
    while sum(len(batch) for batch in labels) < n:
        tokens, counts = _draw(2 * n, groups, filler, lengths, generator)
        top_two = counts.topk(2, dim=1).values
        clear = top_two[:, 0] > top_two[:, 1]
        input_ids.append(tokens[clear])
        labels.append(counts.argmax(1)[clear])
    input_ids, rule = torch.cat(input_ids)[:n], torch.cat(labels)[:n]
    flipped = torch.rand(n, generator=generator) < label_noise
    other = (rule + torch.randint(1, CLASSES, (n,), generator=generator)) % CLASSES
    labels = torch.where(flipped, other, rule)
    return Tokens(input_ids, (input_ids != PAD).long(), labels)


class Classifier(nn.Module):
    """A Hugging Face model as laplace-torch expects it: a dict batch in, logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Logits ``(B, classes)`` of a batch with ``input_ids`` and a mask."""
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits


def llama(hidden: int, layers: int, max_length: int) -> nn.Module:
    """A random-init LLaMA sequence classifier (4 heads, 2 key/value heads)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCABULARY,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_length,
        num_labels=CLASSES,
        pad_token_id=PAD,
        # laplace-torch's Jacobians (torch.func.jacrev) have no batching rule for
        # the backward of the fused CPU attention (torch warns and loops): eager.
        attn_implementation="eager",
    )
    return transformers.LlamaForSequenceClassification(config)


def train(
    model: nn.Module, loader: DataLoader, *, epochs: int, lr: float, seed: int
) -> None:
    """Adam with a small weight decay on the trainable parameters; eval mode after."""
    torch.manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(batch), batch["labels"])
            loss.backward()
            optimizer.step()
    model.eval()


def fit_and_tune(la: Laplace, loader: DataLoader, memory: str = "growth") -> dict:
    """Fit, then tune the prior by marginal likelihood; the costs as a table row.

    ``fit_mib`` is the growth of the resident memory during the fit, or with
    ``memory="peak"`` its peak.
    """
    with PeakMemory() as usage:
        fit_start = time.perf_counter()
        la.fit(loader)
        fit_seconds = time.perf_counter() - fit_start
    tune_start = time.perf_counter()
    la.optimize_prior_precision(method="marglik", pred_type="glm", link_approx="probit")
    return {
        "params": int(la.n_params),
        "prior": la.prior_precision.item(),
        "fit_s": fit_seconds,
        "tune_s": time.perf_counter() - tune_start,
        "fit_mib": usage.peak_mib if memory == "peak" else usage.growth_mib,
    }


def evaluate(
    predictors: dict[str, object],
    tests: dict[str, Dataset],
    rows: dict[str, dict],
    jacobian_batch: int,
) -> dict[str, object]:
    """Each predictor's metrics on each test set and its prediction time, in ``rows``.

    LoRA-KFAC predicts in batches of ``jacobian_batch`` (laplace-torch's dense
    Jacobians), the others in batches of 50; the MAP is the network itself.

    Returns:
        Each predictor's predictions on the ``"test"`` set.
    """
    test_predictions = {}
    for name, predictor in predictors.items():
        options = {"likelihood": "classification"} if name == "MAP" else {}
        batch_size = jacobian_batch if name == "LoRA-KFAC" else 50
        predict_start = time.perf_counter()
        for split, data in tests.items():
            loader = DataLoader(data, batch_size=batch_size)
            predictions = predict(predictor, loader, **options)
            rows[name][split] = classification_metrics(predictions)
            if split == "test":
                test_predictions[name] = predictions
        rows[name]["predict_s"] = time.perf_counter() - predict_start
    return test_predictions


def reliability_figure(test_predictions: dict, title: str, path: Path) -> Path:
    """Reliability diagrams over confidence histograms, one column per method."""
    n = len(test_predictions)
    figure, axes = plotting.new_figure(2 * n, ncols=n, size=(3.4, 3.2))
    for index, (name, predictions) in enumerate(test_predictions.items()):
        plotting.reliability_diagram(
            predictions.probs, predictions.targets, ax=axes[index], title=name
        )
        plotting.confidence_histogram(
            predictions.probs, predictions.targets, ax=axes[n + index], title=name
        )
    figure.suptitle(title)
    return plotting.save_figure(figure, path)


def _cell(value: float | None, width: int, spec: str) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def print_tables(rows: dict[str, dict], memory: str = "fit MiB") -> None:
    """The cost of each method, then its metrics on the test and shifted sets.

    ``memory`` heads the column of each row's ``fit_mib``.
    """
    print(
        f"\n{'method':<11}{'params':>7}{'prior':>9}{'fit s':>8}{'tune s':>8}"
        f"{'predict s':>10}{memory:>9}"
    )
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:<11} failed: {row['error']}")
            continue
        print(
            f"{name:<11}{_cell(row.get('params'), 7, 'd')}"
            f"{_cell(row.get('prior'), 9, '.3g')}"
            f"{_cell(row.get('fit_s'), 8, '.2f')}{_cell(row.get('tune_s'), 8, '.2f')}"
            f"{_cell(row['predict_s'], 10, '.2f')}{_cell(row.get('fit_mib'), 9, '.1f')}"
        )
    print(
        f"\n{'':<11}{'test set':^27}{'shifted test set':^27}\n{'method':<11}"
        + "".join(f"{column:>9}" for column in COLUMNS) * 2
    )
    for name, row in rows.items():
        if "error" not in row:
            print(
                f"{name:<11}"
                + "".join(
                    f"{row[split][column]:>9.4f}"
                    for split in ("test", "shifted")
                    for column in COLUMNS
                )
            )


def accuracy(model: nn.Module, data: Tokens) -> float:
    """The share of ``data``'s labels that the network's argmax predicts."""
    with torch.no_grad():
        correct = sum(
            (model(batch).argmax(-1) == batch["labels"]).sum().item()
            for batch in DataLoader(data, batch_size=200)
        )
    return correct / len(data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=1000, help="target task")
    parser.add_argument("--n-test", type=int, default=500, help="each test set")
    parser.add_argument("--n-base", type=int, default=2000, help="base task")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--base-epochs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=40, help="LoRA fine-tuning")
    parser.add_argument("--label-noise", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path("example-output") / "lora_transformer"
    )
    args = parser.parse_args(argv)
    if args.hidden % 8:
        parser.error(f"--hidden must be a multiple of 8 (4 heads), got {args.hidden}")
    start = time.perf_counter()

    generator = torch.Generator().manual_seed(args.seed)
    base = keyword_task(
        args.n_base, BASE_KEYWORDS, label_noise=0.0, generator=generator
    )
    base_test = keyword_task(
        args.n_test, BASE_KEYWORDS, label_noise=0.0, generator=generator
    )
    target = {"label_noise": args.label_noise, "generator": generator}
    train_set = keyword_task(args.n_train, TARGET_KEYWORDS, **target)
    tests = {
        "test": keyword_task(args.n_test, TARGET_KEYWORDS, **target),
        "shifted": keyword_task(
            args.n_test, TARGET_KEYWORDS, lengths=SHIFTED_LENGTHS, **target
        ),
    }
    print(
        f"{CLASSES} classes, vocabulary {VOCABULARY}: base task {args.n_base} "
        f"sequences; target task {args.n_train} train, {args.n_test} test with "
        f"label noise {args.label_noise:g}; shifted test set: "
        f"{SHIFTED_LENGTHS[0]}-{SHIFTED_LENGTHS[1]} tokens instead of "
        f"{LENGTHS[0]}-{LENGTHS[1]}"
    )

    torch.manual_seed(args.seed)
    model = llama(args.hidden, args.layers, max_length=SHIFTED_LENGTHS[1])
    network = Classifier(model)
    train(
        network,
        DataLoader(base, batch_size=32, shuffle=True),
        epochs=args.base_epochs,
        lr=3e-3,
        seed=args.seed,
    )
    base_accuracy = {
        name: accuracy(network, data)
        for name, data in (("base task", base_test), ("target task", tests["test"]))
    }
    lora = peft.LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["score"],
    )
    network = Classifier(peft.get_peft_model(model, lora))
    train(
        network,
        DataLoader(train_set, batch_size=32, shuffle=True),
        epochs=args.epochs,
        lr=3e-3,
        seed=args.seed,
    )
    print(
        "base model's test accuracy: "
        + ", ".join(f"{value:.3f} on the {key}" for key, value in base_accuracy.items())
        + f"; after LoRA fine-tuning: train accuracy {accuracy(network, train_set):.3f}"
    )
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    total = sum(p.numel() for p in network.parameters())
    head = next(
        name
        for name, _ in network.named_modules()
        if name.endswith("score.modules_to_save.default")
    )
    print(
        f"LLaMA {args.layers} layers, width {args.hidden}: {total} parameters, "
        f"{trainable} trainable (LoRA r={args.rank} on q_proj, v_proj and the head "
        f"{head})"
    )

    fit_loader = DataLoader(train_set, batch_size=100)
    rows: dict[str, dict] = {"MAP": {}}
    predictors: dict[str, object] = {"MAP": network}
    for name, subset, structure in CANDIDATES:
        options = {"last_layer_name": head} if subset == "last_layer" else {}
        try:
            la = Laplace(
                network,
                "classification",
                subset_of_weights=subset,
                hessian_structure=structure,
                **options,
            )
            rows[name] = fit_and_tune(la, fit_loader)
        except (RuntimeError, ValueError, NotImplementedError) as error:
            rows[name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        predictors[name] = la

    print("\nfitted and tuned: " + ", ".join(list(predictors)[1:]))
    test_predictions = evaluate(predictors, tests, rows, JACOBIAN_BATCH)
    print_tables(rows)
    path = reliability_figure(
        test_predictions,
        "LoRA fine-tuned LLaMA classifier: target-task test set",
        args.out / "reliability.png",
    )
    print(f"\nWrote {path} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
