"""Laplace-LoRA in the paper's form: a GPT-2's answer-token logits, with EKFAC.

Laplace-LoRA (Yang et al., 2024) puts a Kronecker-factored Laplace posterior over
the LoRA adapters of a fine-tuned language model and reads a multiple-choice answer
from the model's next-token logits at the last prompt token, restricted to the
answer tokens (``A``, ``B``, ``C``, ``D``). This script does that with a GPT-2
language model (``transformers.GPT2LMHeadModel`` from a config: random init,
nothing downloaded):

* the prompt is a keyword sequence (the task of ``example_lora_transformer.py``:
  the answer is the keyword group with the most keywords; 15% label noise) followed
  by an ``Answer:`` token; the classifier's logits are the language-model head's
  rows of the four answer tokens at that last non-padding position;
* the whole network is first trained as the "base" on the related task, then
  peft's LoRA adapters (on ``c_attn``, ``c_proj`` and ``c_fc``) are fine-tuned
  with Adam on the target task: the MAP;
* LoRA-KFAC (laplace-torch's ``"kron"``) and LoRA-EKFAC (``"ekfac"``) are fitted
  over the adapters, each prior precision tuned by marginal likelihood, and the
  probit GLM predictive evaluated against the MAP on a test set and on a shifted
  one (longer sequences); each method's fit, tuning and prediction time and
  peak memory are printed.

Run: ``python examples/example_laplace_lora.py`` (about 25 seconds on 2 CPU cores),
or at GPT-2-small width (768 wide, 12 heads, 50,257 tokens, 4 layers; no base
training)::

    python examples/example_laplace_lora.py --gpt2-small

Figures go to ``example-output/laplace_lora/`` in the current folder.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

# First: registers hessian_structure="ekfac" (and hides a notice of asdl's import).
import ekfac_laplace  # noqa: F401

# isort: split
import peft
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path, not installed
from example_lora_transformer import (  # noqa: E402  (the task and the tables)
    BASE_KEYWORDS,
    CLASSES,
    LENGTHS,
    SHIFTED_LENGTHS,
    TARGET_KEYWORDS,
    VOCABULARY,
    Tokens,
    accuracy,
    evaluate,
    fit_and_tune,
    keyword_task,
    print_tables,
    reliability_figure,
    train,
)
from laplace import Laplace  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

warnings.filterwarnings("ignore", message="By default `link_approx` is `probit`")
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")

#: The answer tokens ``A`` … ``D`` and the ``Answer:`` token, after the task's.
ANSWERS = tuple(range(VOCABULARY, VOCABULARY + CLASSES))
ANSWER_PROMPT = VOCABULARY + CLASSES
CANDIDATES = (("LoRA-KFAC", "kron"), ("LoRA-EKFAC", "ekfac"))
#: laplace-torch's KFAC predictive computes dense Jacobians (torch.func.jacrev, B·C
#: backward passes of the whole batch): small batches keep its memory in bounds.
JACOBIAN_BATCH = 4


class AnswerLogits(nn.Module):
    """The language model's logits of the answer tokens at the last prompt token.

    ``logits_{n,c} = w_{a_c}ᵀ h_{n,t_n}``: the head's rows of the answer tokens
    ``a_c`` against the last non-padding position ``t_n``'s hidden state, the same
    numbers as the full ``(B, T, V)`` logits restricted, without computing them.
    """

    def __init__(self, model: nn.Module, answers: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("answers", torch.tensor(answers), persistent=False)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Answer logits ``(B, answers)`` of prompts with right padding."""
        lm = self.model
        if isinstance(lm, peft.PeftModel):  # its LoRA layers sit in the base model
            lm = lm.get_base_model()
        hidden = lm.transformer(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        last = batch["attention_mask"].sum(1) - 1
        features = hidden[torch.arange(len(hidden)), last]
        return features @ lm.lm_head.weight[self.answers].T


def prompts(data: Tokens) -> Tokens:
    """Each sequence followed by the ``Answer:`` token (one more column)."""
    ids = nn.functional.pad(data.input_ids, (0, 1))
    lengths = data.attention_mask.sum(1)
    ids[torch.arange(len(ids)), lengths] = ANSWER_PROMPT
    return Tokens(ids, (ids != 0).long(), data.labels)


def gpt2(width: int, layers: int, heads: int, vocabulary: int) -> nn.Module:
    """A random-init GPT-2 language model (eager attention, pad token 0)."""
    config = transformers.GPT2Config(
        vocab_size=vocabulary,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        n_positions=SHIFTED_LENGTHS[1] + 1,
        pad_token_id=0,
        bos_token_id=ANSWER_PROMPT,  # GPT-2's default, 50,256, may not exist
        eos_token_id=ANSWER_PROMPT,
        # laplace-torch's Jacobians (torch.func.jacrev) have no batching rule for
        # the backward of the fused CPU attention: eager.
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=1000, help="target task")
    parser.add_argument("--n-test", type=int, default=300, help="each test set")
    parser.add_argument("--n-base", type=int, default=1000, help="base task")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocabulary", type=int, default=ANSWER_PROMPT + 1)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--base-epochs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=20, help="LoRA fine-tuning")
    parser.add_argument("--label-noise", type=float, default=0.15)
    parser.add_argument(
        "--gpt2-small",
        action="store_true",
        help="GPT-2-small width: 768 wide, 12 heads, 50,257 tokens, 4 layers, no "
        "base training, 300 target sequences and 100 per test set",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path("example-output") / "laplace_lora"
    )
    args = parser.parse_args(argv)
    if args.gpt2_small:
        args.width, args.heads, args.vocabulary, args.layers = 768, 12, 50_257, 4
        args.base_epochs, args.n_train, args.n_test, args.epochs = 0, 300, 100, 3
    if args.width % args.heads:
        parser.error(f"--width {args.width} is not a multiple of --heads")
    if args.vocabulary <= ANSWER_PROMPT:
        parser.error(f"--vocabulary must exceed {ANSWER_PROMPT} (the task's tokens)")
    start = time.perf_counter()

    generator = torch.Generator().manual_seed(args.seed)
    base = prompts(
        keyword_task(args.n_base, BASE_KEYWORDS, label_noise=0.0, generator=generator)
    )
    target = {"label_noise": args.label_noise, "generator": generator}
    train_set = prompts(keyword_task(args.n_train, TARGET_KEYWORDS, **target))
    tests = {
        "test": prompts(keyword_task(args.n_test, TARGET_KEYWORDS, **target)),
        "shifted": prompts(
            keyword_task(
                args.n_test, TARGET_KEYWORDS, lengths=SHIFTED_LENGTHS, **target
            )
        ),
    }
    print(
        f"GPT-2 of width {args.width}, {args.layers} layers, vocabulary "
        f"{args.vocabulary}; {CLASSES} answer tokens at the last prompt token; base "
        f"task {args.n_base if args.base_epochs else 0} sequences, target task "
        f"{args.n_train} train, {args.n_test} test with label noise "
        f"{args.label_noise:g}; shifted test set: {SHIFTED_LENGTHS[0]}-"
        f"{SHIFTED_LENGTHS[1]} tokens instead of {LENGTHS[0]}-{LENGTHS[1]}"
    )

    torch.manual_seed(args.seed)
    model = gpt2(args.width, args.layers, args.heads, args.vocabulary)
    if args.base_epochs:
        train(
            AnswerLogits(model, ANSWERS),
            DataLoader(base, batch_size=32, shuffle=True),
            epochs=args.base_epochs,
            lr=3e-3,
            seed=args.seed,
        )
    lora = peft.LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,  # GPT-2's Conv1D stores its weight transposed
    )
    network = AnswerLogits(peft.get_peft_model(model, lora), ANSWERS)
    train(
        network,
        DataLoader(train_set, batch_size=32, shuffle=True),
        epochs=args.epochs,
        lr=3e-3,
        seed=args.seed,
    )
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    print(
        f"LoRA r={args.rank} on c_attn, c_proj, c_fc: {trainable} parameters; "
        f"train accuracy {accuracy(network, train_set):.3f}, test accuracy "
        f"{accuracy(network, tests['test']):.3f}"
    )

    rows: dict[str, dict] = {"MAP": {}}
    predictors: dict[str, object] = {"MAP": network}
    for name, structure in CANDIDATES:
        la = Laplace(
            network,
            "classification",
            subset_of_weights="all",
            hessian_structure=structure,
        )
        rows[name] = fit_and_tune(la, DataLoader(train_set, batch_size=16), "peak")
        predictors[name] = la

    test_predictions = evaluate(predictors, tests, rows, JACOBIAN_BATCH)
    print_tables(rows, memory="peak MiB")
    path = reliability_figure(
        test_predictions,
        "Laplace-LoRA on GPT-2's answer tokens: test set",
        args.out / "reliability.png",
    )
    print(f"\nWrote {path} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
