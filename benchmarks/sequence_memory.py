"""Peak memory and time of an EKFAC fit on token sequences, against width.

One ``d × d`` Linear on sequences of 128 tokens (``x → tanh(W x + b)``, mean over
the tokens, a 10-class head), exact GGN, all weights, N = 64 sequences in batches
of 16, for d = 1,024, 2,048 and 4,096; and the LoRA adapters of a LLaMA-style
classifier (Hugging Face, built from a config). Each configuration runs in a fresh
process; the peak resident memory (``ru_maxrss``) is reported beside what the
model, the data and the posterior hold by themselves (the floor), so that the
difference is what the fit needs on top.

``--unchunked`` forms every example's rotated ``(d_out, d_in)`` gradient of a batch
at once in the eigenvalue correction (as before the chunking): the comparison
shows what the chunking bounds.

Usage::

    python benchmarks/sequence_memory.py                # writes results/
    python benchmarks/sequence_memory.py --quick        # widths 256 and 512
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS, CLASSES, N, BATCH = 128, 10, 64, 16


class SequenceLinear(nn.Module):
    """One ``d × d`` Linear at every token, the mean over tokens, a head."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.head(torch.tanh(self.linear(x)).mean(1))


class Tokens(Dataset):
    """Hugging Face-style examples without padding."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor) -> None:
        self.tokens, self.labels = tokens, labels

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.tokens[index],
            "attention_mask": torch.ones_like(self.tokens[index]),
            "labels": self.labels[index],
        }


class Classifier(nn.Module):
    """A Hugging Face model that returns its logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # noqa: D102
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits


def _linear_case(width: int) -> tuple[nn.Module, DataLoader, int]:
    model = SequenceLinear(width).eval()
    X = torch.randn(N, TOKENS, width)
    y = torch.randint(0, CLASSES, (N,))
    floor = (
        X.numel() + 4 * width * width
    ) * 4  # data, W, and the posterior's Q_G, Q_A, λ
    return model, DataLoader(TensorDataset(X, y), batch_size=BATCH), floor


def _lora_case() -> tuple[nn.Module, DataLoader, int]:
    import peft
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=TOKENS,
        num_labels=CLASSES,
        pad_token_id=0,
    )
    base = transformers.LlamaForSequenceClassification(config)
    lora = peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    model = Classifier(peft.get_peft_model(base, lora)).eval()
    tokens = torch.randint(1, 1000, (N, TOKENS))
    labels = torch.randint(0, CLASSES, (N,))
    floor = sum(p.numel() for p in model.parameters()) * 4
    return model, DataLoader(Tokens(tokens, labels), batch_size=BATCH), floor


def run_one(case: str, unchunked: bool) -> dict[str, float]:
    """One configuration in this process."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    import ekfac_laplace
    from ekfac_laplace.accumulators import corrections

    if unchunked:
        corrections.CHUNK_NUMBERS = 2**62
    model, loader, floor = _lora_case() if case == "lora" else _linear_case(int(case))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    la = ekfac_laplace.EKFACLaplace(model, "classification")
    la.fit(loader)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "case": case,
        "unchunked": unchunked,
        "seconds": seconds,
        "peak_bytes": peak,
        "before_fit_bytes": before,
        "floor_bytes": floor,
        "posterior_parameters": sum(p.numel() for p in la.params),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--unchunked", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.unchunked)))
        return
    cases = ["256", "512"] if args.quick else ["1024", "2048", "4096", "lora"]
    rows = []
    for case in cases:
        for unchunked in (False, True):
            command = [sys.executable, __file__, "--one", case]
            command += ["--unchunked"] if unchunked else []
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            extra = (row["peak_bytes"] - row["before_fit_bytes"]) / 2**20
            print(
                f"{case:>5} {'unchunked' if unchunked else 'chunked':>9}: "
                f"{row['seconds']:6.1f} s, peak {row['peak_bytes'] / 2**20:7.0f} MiB, "
                f"fit adds {extra:6.0f} MiB "
                f"(model+data+posterior floor {row['floor_bytes'] / 2**20:5.0f} MiB)",
                flush=True,
            )
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "sequence_memory.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
