"""Laplace-LoRA at GPT-2-small width: EKFAC against KronLaplace on the same adapters.

A ``GPT2ForSequenceClassification`` of GPT-2-small width (768 wide, 12 heads, a
vocabulary of 50,257; 4 or 12 layers) is built offline from a config with random
weights. peft's LoRA adapters (``r = 8`` on ``c_attn``, ``c_proj`` and ``c_fc``:
98,304 parameters per layer) are the posterior's parameters, every other weight
frozen; the adapters' ``B`` is drawn away from zero, as after fine-tuning. The data
are 32 right-padded sequences of ``T`` tokens (lengths drawn from ``T/2 … T``; 4
labels), in batches of 4, and 8 such sequences to predict.

Measured the way :mod:`timing` describes (fresh workers, contenders interleaved
``Kron EKFAC floor …`` over ``--rounds`` rounds, cold and warm, peak memory), for
laplace-torch's KronLaplace and EKFAC (both on laplace-torch's curvlinops backend,
the same LoRA parameters), phase by phase:

* ``fit_ggn``: the exact-GGN fit; ``fit_mc``: one Monte-Carlo label;
* ``glm8``: the GLM predictive (probit) of 8 sequences;
* ``sample100``: 100 posterior samples;
* ``marglik100``: 100 steps of marginal-likelihood prior tuning;

each after-fit phase in a worker of its own, after an untimed Monte-Carlo fit. The
``floor`` contender times what no method can skip: per batch one forward pass and
one backward pass per output class (``fit_ggn``, the GLM's 8 sequences) or one
(``fit_mc``), to the LoRA parameters.

Usage::

    python benchmarks/lora_gpt2.py                          # 4 layers, T = 128
    python benchmarks/lora_gpt2.py --cases l4_t512 l12_t128 --rounds 1 --warm 0
    python benchmarks/lora_gpt2.py --quick                  # tiny, one process
    python benchmarks/lora_gpt2.py --device cuda --name lora_gpt2_cuda

Timings are comparable only within one run: compare the ratios.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
warnings.filterwarnings("ignore")

from timing import (  # noqa: E402
    interleave,
    interleaved_parser,
    median_of,
    ratio,
    run_worker,
    spread,
    worker_main,
)

#: name: layers and tokens per sequence (GPT-2-small width).
CASES: dict[str, dict[str, int]] = {
    "l4_t128": {"layers": 4, "tokens": 128},
    "l4_t512": {"layers": 4, "tokens": 512},
    "l12_t128": {"layers": 12, "tokens": 128},
    "l12_t512": {"layers": 12, "tokens": 512},
}
#: The model's sizes at GPT-2-small width, and the tiny ones of ``--quick``.
FULL = {"width": 768, "heads": 12, "vocabulary": 50_257, "rank": 8}
QUICK = {
    "width": 32,
    "heads": 4,
    "vocabulary": 100,
    "rank": 2,
    "layers": 1,
    "tokens": 16,
}
SEQUENCES, BATCH, CLASSES, PREDICTED = 32, 4, 4, 8
CONTENDERS = ("kron", "ekfac", "floor")
#: EKFAC on the model cast to half precision (on request: ``--contenders``).
HALF = {"ekfac_bf16": torch.bfloat16, "ekfac_fp16": torch.float16}
NAMES = {"kron": "Kron", "ekfac": "EKFAC", "floor": "floor"}
NAMES.update(ekfac_bf16="EKFAC bf16", ekfac_fp16="EKFAC fp16")
PHASES = ("fit_ggn", "fit_mc", "glm8", "sample100", "marglik100")
FIT_PHASES = ("fit_ggn", "fit_mc")
ALL_WEIGHTS = {"subset": "all"}  # the trainable ones: the adapters
#: Phases the floor has (the work no method skips); the others have none.
FLOOR_PHASES = ("fit_ggn", "fit_mc", "glm8")


def build(case: str, quick: bool = False, seed: int = 0) -> tuple[Any, Any, Any]:
    """The LoRA model, its training data and the sequences to predict.

    Args:
        case: A key of :data:`CASES` (ignored with ``quick``).
        quick: The tiny model of :data:`QUICK`.
        seed: Seeds the weights and the data.

    Returns:
        The model (a dict batch in, logits ``(B, 4)`` out), a dataset of dict
        examples with ``labels``, and a dict batch of 8 sequences.
    """
    import peft
    import transformers

    sizes = QUICK if quick else {**FULL, **CASES[case]}
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=sizes["vocabulary"],
        n_embd=sizes["width"],
        n_layer=sizes["layers"],
        n_head=sizes["heads"],
        n_positions=max(1024, sizes["tokens"]),
        num_labels=CLASSES,
        pad_token_id=0,
    )
    base = transformers.GPT2ForSequenceClassification(config)
    lora = peft.LoraConfig(
        r=sizes["rank"],
        lora_alpha=2 * sizes["rank"],
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,  # GPT-2's Conv1D stores its weight transposed
    )
    network = peft.get_peft_model(base, lora)
    for name, module in network.named_modules():
        if name.endswith("lora_B.default"):  # zero at initialisation
            nn.init.normal_(module.weight, std=0.02)
    model = Classifier(network).eval()
    generator = torch.Generator().manual_seed(seed)
    tokens = sizes["tokens"]

    def sequences(n: int) -> dict[str, Tensor]:
        lengths = torch.randint(tokens // 2, tokens + 1, (n, 1), generator=generator)
        mask = (torch.arange(tokens) < lengths).long()
        ids = torch.randint(1, sizes["vocabulary"], (n, tokens), generator=generator)
        return {"input_ids": ids * mask, "attention_mask": mask}

    train = sequences(SEQUENCES)
    labels = torch.randint(0, CLASSES, (SEQUENCES,), generator=generator)
    return model, Sequences(train, labels), sequences(PREDICTED)


class Classifier(nn.Module):
    """A Hugging Face model as laplace-torch expects it: a dict batch in, logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor]) -> Tensor:  # noqa: D102
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits


class Sequences:
    """Dict examples ``{"input_ids", "attention_mask", "labels"}``."""

    def __init__(self, inputs: dict[str, Any], labels: Any) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            **{key: value[index] for key, value in self.inputs.items()},
            "labels": self.labels[index],
        }


def make_laplace(model: Any, structure: str, stochastic: bool) -> Any:
    """KronLaplace or EKFAC over the trainable (LoRA) parameters, as the benchmark's."""
    import benchmark

    return benchmark.make_laplace(model, "lora", structure, stochastic, ALL_WEIGHTS)


def floor_pass(model: Any, loader: Any, passes_per_batch: int | None) -> None:
    """Per batch, one forward pass and a backward pass per output (or ``n``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        for batch in loader:
            f = model(batch)
            outputs = f.shape[1] if passes_per_batch is None else passes_per_batch
            for c in range(outputs):
                torch.autograd.grad(f[:, c].sum(), params, retain_graph=c < outputs - 1)


def measure(
    case: str,
    contender: str,
    phase: str,
    warm: int,
    quick: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """One phase of one contender in this (fresh) process.

    Returns:
        :func:`timing.time_calls`'s timing, ``{"skipped": reason}``, with the
        number of posterior parameters.
    """
    from timing import pin_threads, time_calls
    from torch.utils.data import DataLoader, default_collate

    pin_threads()
    model, data, X = build(case, quick)
    model = model.to(device, HALF.get(contender, torch.float32))
    X = {key: value.to(device) for key, value in X.items()}

    def on_device(examples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {k: v.to(device) for k, v in default_collate(examples).items()}

    loader = DataLoader(data, batch_size=BATCH, collate_fn=on_device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if contender == "floor":
        if phase not in FLOOR_PHASES:
            return {"skipped": "no floor", "n_params": n_params}
        actions = {
            "fit_ggn": lambda: floor_pass(model, loader, None),
            "fit_mc": lambda: floor_pass(model, loader, 1),
            "glm8": lambda: floor_pass(model, [X], None),
        }
        timing = time_calls(actions[phase], warm, device)
        return {**timing, "n_params": n_params}
    structure = "ekfac" if contender in HALF else contender
    if phase in FIT_PHASES:
        la = make_laplace(model, structure, phase == "fit_mc")
        timing = time_calls(lambda: la.fit(loader), warm, device)
        return {**timing, "n_params": n_params}
    la = make_laplace(model, structure, True)
    la.fit(loader)  # the phases' cost does not depend on the curvature type
    generator = torch.Generator(device=device).manual_seed(0)
    actions = {
        "glm8": lambda: la(X, pred_type="glm", link_approx="probit"),
        "sample100": lambda: la.sample(100, generator=generator),
        "marglik100": lambda: la.optimize_prior_precision(
            method="marglik", n_steps=100
        ),
    }
    return {**time_calls(actions[phase], warm, device), "n_params": n_params}


def markdown_table(
    rows: list[dict[str, Any]], warm: bool, contenders: Sequence[str] = CONTENDERS
) -> str:
    """Per case and phase: each contender's seconds and peak memory, and ratios.

    EKFAC's to Kron and to the floor, and a half-precision EKFAC's to EKFAC.
    """
    key = "warm" if warm else "cold"
    ratios = [
        (numerator, denominator)
        for numerator, denominator in (
            ("ekfac", "kron"),
            ("ekfac", "floor"),
            *((half, "ekfac") for half in HALF),
        )
        if numerator in contenders and denominator in contenders
    ]
    peaks = [c for c in contenders if c != "floor"]
    header = [
        "case",
        "phase",
        *(f"{NAMES[c]} s" for c in contenders),
        *(f"{NAMES[n]}/{NAMES[d]} {key}" for n, d in ratios),
        *(f"{NAMES[c]} peak GiB" for c in peaks),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in dict.fromkeys(r["case"] for r in rows):
        for phase in dict.fromkeys(r["phase"] for r in rows if r["case"] == case):
            part = [r for r in rows if r["case"] == case and r["phase"] == phase]
            cells = [case, phase]
            for contender in contenders:  # an error: in place of the seconds
                errors = [
                    r["error"]
                    for r in part
                    if r["contender"] == contender and "error" in r
                ]
                value = median_of(part, contender, key)
                cells.append(
                    f"{value:.2f}" if value == value else (errors[0] if errors else "–")
                )
            cells += [spread(ratio(part, n, d, key)) for n, d in ratios]
            for contender in peaks:
                peak = median_of(part, contender, "peak_mib")
                cells.append(f"{peak / 1024:.1f}" if peak == peak else "–")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    rows: list[dict[str, Any]],
    path: Path,
    warm: bool,
    contenders: Sequence[str] = CONTENDERS,
) -> None:
    """Seconds per phase and case, one bar per contender (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "warm" if warm else "cold"
    cases = list(dict.fromkeys(r["case"] for r in rows))
    phases = [p for p in PHASES if any(r["phase"] == p for r in rows)]
    figure, axes = plt.subplots(
        1, len(phases), figsize=(3.2 * len(phases), 3.2), squeeze=False
    )
    for ax, phase in zip(axes[0], phases):
        width = 0.8 / len(contenders)
        for offset, contender in enumerate(contenders):
            values = [
                median_of(
                    [r for r in rows if r["case"] == c and r["phase"] == phase],
                    contender,
                    key,
                )
                for c in cases
            ]
            ax.bar(
                [
                    i + width * (offset - (len(contenders) - 1) / 2)
                    for i in range(len(cases))
                ],
                values,
                width=width,
                label=NAMES[contender],
            )
        ax.set_xticks(range(len(cases)), cases, rotation=30)
        ax.set_yscale("log")
        ax.set_title(phase)
        ax.set_ylabel(f"{key} seconds")
    axes[0][0].legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = interleaved_parser(__doc__.splitlines()[0], ["l4_t128"], PHASES)
    parser.add_argument("--quick", action="store_true", help="tiny, one process")
    parser.add_argument("--plot", type=Path, default=None, help="bar chart to write")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--name", default=None, help="results file name")
    parser.add_argument(
        "--contenders",
        nargs="*",
        default=list(CONTENDERS),
        choices=[*CONTENDERS, *HALF],
        help="ekfac_bf16 / ekfac_fp16: EKFAC on the model in half precision",
    )
    args = parser.parse_args(argv)
    if worker_main(args, measure):
        return 0
    cases = ["quick"] if args.quick else args.cases
    rows = []
    for case in cases:
        for phase in args.phases:

            def one(contender: str, _round: int, case=case, phase=phase) -> dict:
                payload = [case, contender, phase, args.warm, args.quick, args.device]
                if args.quick:
                    return measure(*payload)
                return run_worker(Path(__file__), payload)

            results = interleave(args.contenders, args.rounds, one, print)
            rows += [
                {"case": case, "phase": phase, **r}
                for r in results
                if "skipped" not in r
            ]
    table = markdown_table(rows, args.warm > 0, args.contenders)
    print(table)
    name = args.name or ("lora_gpt2_quick" if args.quick else "lora_gpt2")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    (args.out / f"{name}.md").write_text(table + "\n")
    if args.plot is not None:
        plot(rows, args.plot, args.warm > 0, args.contenders)
    return 0


if __name__ == "__main__":
    sys.exit(main())
