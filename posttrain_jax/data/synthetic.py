"""Synthetic arithmetic word problems and a tokenizer for them (the quickstart).

Problems are additions and subtractions of numbers below 50 in a handful of
phrasings ("Tom has 12 apples and buys 7 more. How many apples does he have
now?" -> "19"): small enough for a ~1M-parameter model to learn in minutes
on a CPU, and checkable exactly (`check_answer`), so the same data serves
SFT, evaluation and RL with a verifiable reward. Everything is deterministic
given the seed, and `train_sentencepiece` makes a tokenizer from the
generated text, so the quickstart downloads nothing.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from posttrain_jax.chat import CHATML_JINJA, QWEN25_DEFAULT_SYSTEM

# The special tokens of every template in posttrain_jax.tokenizer
# (CHAT_TEMPLATES), so one tokenizer works with any of them; a test renders
# each template with it, which catches a template added without its tokens here.
CHAT_SPECIAL_TOKENS = (
    "<|im_start|>", "<|im_end|>",  # chatml, qwen2.5
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",  # llama3
    "<start_of_turn>", "<end_of_turn>",  # gemma
)  # fmt: skip
MAX_OPERAND = 49

_NAMES = (("Tom", "he"), ("Anna", "she"), ("Sam", "he"), ("Lily", "she"), ("Ben", "he"), ("Mia", "she"))
_ITEMS = ("apples", "books", "coins", "pencils", "stickers", "marbles", "cookies", "shells")
# (template, operation); {a} is the larger operand for subtraction.
_TEMPLATES = (
    ("{name} has {a} {item} and buys {b} more. How many {item} does {pronoun} have now?", "+"),
    ("There are {a} {item} in a box. {name} puts in {b} more. How many {item} are in the box?", "+"),
    ("What is {a} plus {b}?", "+"),
    ("{name} has {a} {item} and gives {b} to a friend. How many {item} does {pronoun} have left?", "-"),
    ("There are {a} {item} on the table. {name} takes {b} away. How many {item} are left?", "-"),
    ("What is {a} minus {b}?", "-"),
)


@dataclass(frozen=True)
class ArithmeticProblem:
    """One word problem: the question, the operands and the integer answer."""

    question: str
    a: int
    b: int
    op: str
    answer: int

    def response(self, *, show_work: bool = False) -> str:
        """The assistant's reply: the answer, or "a + b = answer"."""
        return f"{self.a} {self.op} {self.b} = {self.answer}" if show_work else str(self.answer)

    def messages(self, *, show_work: bool = False) -> list[dict[str, str]]:
        """The problem as a user turn and an assistant turn."""
        return [{"role": "user", "content": self.question},
                {"role": "assistant", "content": self.response(show_work=show_work)}]  # fmt: skip


def make_problem(rng: random.Random, max_operand: int = MAX_OPERAND) -> ArithmeticProblem:
    """Draw one problem using `rng`."""
    template, op = rng.choice(_TEMPLATES)
    name, pronoun = rng.choice(_NAMES)
    a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
    if op == "-" and b > a:  # keep answers non-negative
        a, b = b, a
    answer = a + b if op == "+" else a - b
    question = template.format(name=name, pronoun=pronoun, item=rng.choice(_ITEMS), a=a, b=b)
    return ArithmeticProblem(question=question, a=a, b=b, op=op, answer=answer)


def generate_problems(num_problems: int, *, seed: int = 0, max_operand: int = MAX_OPERAND) -> list[ArithmeticProblem]:
    """`num_problems` problems, the same for the same seed."""
    rng = random.Random(seed)
    return [make_problem(rng, max_operand) for _ in range(num_problems)]


def write_arithmetic_jsonl(path: str | Path, num_problems: int, *, seed: int = 0, max_operand: int = MAX_OPERAND,
                           show_work: bool = False) -> Path:  # fmt: skip
    """Write problems as chat JSONL rows ``{"messages": [...], "answer": int}``.

    The extra "answer" field is ignored by the SFT loader and is the ground
    truth for evaluation and RL rewards.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for problem in generate_problems(num_problems, seed=seed, max_operand=max_operand):
            row = {"messages": problem.messages(show_work=show_work), "answer": problem.answer}
            f.write(json.dumps(row) + "\n")
    return path


# The loss-aggregation ablation's task: the same problems in two reply lengths. A short reply is the bare
# answer (about 3 loss tokens, all of them hard: the sum itself); a long reply works it
# (about 30 loss tokens, most of them easy copies of the question's numbers). How a global batch's token
# losses are averaged decides how much each kind of reply weighs: per token (`sum`, `token_mean`) the
# long replies dominate; per micro-batch (`mean_per_microbatch`) the weight of each row grows as the
# micro-batch shrinks, so short replies (and their hard tokens) count for more, by an amount that depends
# on how the batch is split over devices and accumulation steps.
LENGTH_STYLES = ("short", "long")
_STYLE_SUFFIX = {"short": " Answer with the number only.", "long": " Explain step by step."}


def length_mix_messages(problem: ArithmeticProblem, style: str) -> list[dict[str, str]]:
    """The problem as a chat in one of `LENGTH_STYLES` (the user turn says which reply it wants)."""
    if style == "short":
        reply = str(problem.answer)
    elif style == "long":
        verb = "plus" if problem.op == "+" else "minus"
        reply = (f"We start from {problem.a}. We compute {problem.a} {verb} {problem.b}. "
                 f"{problem.a} {problem.op} {problem.b} = {problem.answer}. So the answer is {problem.answer}.")
    else:
        raise ValueError(f"unknown reply style {style!r}; expected one of {LENGTH_STYLES}")
    return [{"role": "user", "content": problem.question + _STYLE_SUFFIX[style]},
            {"role": "assistant", "content": reply}]


def write_length_mix_jsonl(path: str | Path, num_problems: int, *, seed: int = 0, max_operand: int = MAX_OPERAND,
                           long_fraction: float = 0.5, styles: tuple[str, ...] = LENGTH_STYLES) -> Path:
    """Write problems with short or long replies (`long_fraction` of them long) as chat JSONL rows
    ``{"messages": [...], "answer": int, "style": "short" | "long"}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 7919)
    with path.open("w", encoding="utf-8") as f:
        for problem in generate_problems(num_problems, seed=seed, max_operand=max_operand):
            style = styles[0] if len(styles) == 1 else ("long" if rng.random() < long_fraction else "short")
            row = {"messages": length_mix_messages(problem, style), "answer": problem.answer, "style": style}
            f.write(json.dumps(row) + "\n")
    return path


def length_mix_corpus(num_problems: int = 2000, *, seed: int = 0) -> list[str]:
    """`corpus()` plus both reply styles: a tokenizer for the ablation task."""
    lines = corpus(num_problems, seed=seed)
    for problem in generate_problems(num_problems // 4, seed=seed + 1):
        lines += [m["content"] for style in LENGTH_STYLES for m in length_mix_messages(problem, style)]
    return lines


_INTEGER = re.compile(r"-?\d+")


def extract_answer(text: str) -> int | None:
    """The last integer in `text`, or None if there is none."""
    found = _INTEGER.findall(text)
    return int(found[-1]) if found else None


def check_answer(text: str, expected: int) -> bool:
    """Whether the last integer in a model's reply equals `expected`
    (so "19", "The answer is 19." and "12 + 7 = 19" all count)."""
    return extract_answer(text) == int(expected)


def corpus(num_problems: int = 2000, *, seed: int = 0) -> list[str]:
    """Text to train a tokenizer on: questions, both response styles, role names."""
    # Role names follow a special token in every turn header, so they get
    # their own lines, as often as turns occur, to become single pieces. The
    # Qwen 2.5 default system prompt is part of every qwen2.5 rendering.
    lines = ["system", "model", QWEN25_DEFAULT_SYSTEM]
    for problem in generate_problems(num_problems, seed=seed):
        lines += ["user", problem.question, "assistant", problem.response(), problem.response(show_work=True)]
    return lines


def train_sentencepiece(model_prefix: str | Path, texts: Iterable[str] | None = None, *,
                        vocab_size: int = 512) -> Path:  # fmt: skip
    """Train a small BPE SentencePiece model and return its ``.model`` path.

    Trained on `texts` (default: `corpus()`). The chat tokens of every
    template are user_defined_symbols (matched in text, as `render_chat`
    needs), and a ChatML ``chat_template.jinja`` is written next to it
    (its own template); unk/bos/eos/pad are ids 0-3 (``<unk> <s> </s> <pad>``). Byte
    fallback and identity normalisation make it lossless on any text; digits
    are split so numbers are digit sequences. `vocab_size` is an upper bound
    (a small corpus may support fewer pieces).
    """
    import sentencepiece as spm

    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus() if texts is None else texts)), model_prefix=str(model_prefix),
        model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False,
        user_defined_symbols=list(CHAT_SPECIAL_TOKENS), unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        pad_piece="<pad>", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, character_coverage=1.0, num_threads=1,
        minloglevel=2,
    )  # fmt: skip
    model_path = model_prefix.with_name(model_prefix.name + ".model")
    ensure_chat_template(model_path)
    return model_path


def ensure_chat_template(model_path: str | Path) -> None:
    """Give a quickstart tokenizer its own chat template (ChatML, ``chat_template.jinja`` next to it), so
    chat_template="auto" renders with it; also for tokenizers written before templates were shipped."""
    target = Path(model_path).parent / "chat_template.jinja"
    if not target.exists():
        target.write_text(CHATML_JINJA, encoding="utf-8")


def make_quickstart_data(directory: str | Path, *, num_train: int = 20000, num_eval: int = 500, seed: int = 0,
                         max_operand: int = MAX_OPERAND,
                         show_work: bool = False, vocab_size: int = 512) -> dict[str, Path]:  # fmt: skip
    """Write ``train.jsonl``, ``eval.jsonl`` (another seed) and
    ``tokenizer.model`` into `directory`; return their paths by name."""
    directory = Path(directory)
    return {
        "train": write_arithmetic_jsonl(directory / "train.jsonl", num_train, seed=seed, show_work=show_work,
                                        max_operand=max_operand),
        "eval": write_arithmetic_jsonl(directory / "eval.jsonl", num_eval, seed=seed + 1, show_work=show_work,
                                       max_operand=max_operand),
        "tokenizer": train_sentencepiece(directory / "tokenizer", corpus(seed=seed), vocab_size=vocab_size),
    }
