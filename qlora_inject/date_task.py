"""The default job's task: write a date given in words as YYYY-MM-DD. Generated here, deterministic.

    Date: the 28th of October, 1967
    YYYY-MM-DD: 1967-10-28

Dates come in five spellings ("October 28, 1967", "28 October 1967", "Oct 28 1967", "the 28th of
October, 1967", "28.10.1967"); the answer is the ISO date and a newline. Training and held-out
dates never overlap. SmolLM2-135M-Instruct knows months and numbers but answers none of these in the
asked form; a short LoRA fine-tune teaches it. The task metric is exact match under greedy decoding,
computed from one teacher-forced forward pass: greedy decoding writes the answer exactly when every
answer token (the newline included) is the arg-max given the prompt and the answer's earlier tokens.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
FIRST, LAST = datetime.date(1900, 1, 1).toordinal(), datetime.date(2099, 12, 31).toordinal()
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str                                         # " 1967-10-28\n": what the model must write


@dataclass
class Evaluation:
    """Held-out scores: exact-match accuracy, mean answer-token loss, and a few greedy generations."""

    accuracy: float
    loss: float
    samples: list[tuple[str, str, str]]                 # (date as given, expected, generated)

    @property
    def perplexity(self) -> float:
        return float(torch.tensor(self.loss).exp())


class DateTask:
    """The default job's data and scoring, with the model's own tokenizer.

    Args:
        model_dir: The model's directory (its tokenizer is read from there).
        batch_size: Examples per training batch.
        train_size: Training examples (sampled with replacement, in the order a torch.Generator gives).
        held_out_size: Held-out examples, scored before and after training.
    """

    def __init__(self, model_dir: Path, batch_size: int, train_size: int = 2000, held_out_size: int = 48):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.train_examples, self.held_out = make_split(train_size, held_out_size)
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = self.tokenizer.eos_token_id if pad_id is None else pad_id
        self.encoded = encode(self.train_examples, _tokenize(self.tokenizer))
        self.sample = sampler(self.encoded, batch_size, self.pad_id)

    @property
    def text(self) -> str:
        """The training examples as one text (what a checkpoint's data fingerprint covers)."""
        return "".join(item.prompt + item.answer for item in self.train_examples)

    def evaluate(self, model) -> Evaluation:
        return evaluate(model, self.tokenizer, self.held_out)

    def table(self, before: Evaluation, after: Evaluation) -> str:
        return before_after_table(before, after, len(self.held_out))


def spell(date: datetime.date, style: int) -> str:
    """`date` in one of five spellings."""
    month, day, year = MONTHS[date.month - 1], date.day, date.year
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return (f"{month} {day}, {year}", f"{day} {month} {year}", f"{month[:3]} {day} {year}",
            f"the {day}{suffix} of {month}, {year}", f"{day:02d}.{date.month:02d}.{year}")[style % 5]


def example(date: datetime.date, style: int) -> Example:
    return Example(f"Date: {spell(date, style)}\nYYYY-MM-DD:", f" {date.isoformat()}\n")


def make_split(train_size: int = 2000, held_out_size: int = 48, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Training and held-out examples over disjoint dates, the same for the same arguments."""
    rng = random.Random(seed)
    ordinals = rng.sample(range(FIRST, LAST + 1), train_size + held_out_size)
    examples = [example(datetime.date.fromordinal(o), rng.randrange(5)) for o in ordinals]
    return examples[held_out_size:], examples[:held_out_size]


def encode(examples: list[Example], tokenize: Callable[[str], list[int]]) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels per example: the prompt's labels are -100 (only the answer is learned)."""
    encoded = []
    for item in examples:
        prompt, answer = tokenize(item.prompt), tokenize(item.answer)
        encoded.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return encoded


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `(input_ids, labels)`; padding's labels are -100, and causal attention never sees it."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, targets) in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(targets)] = torch.tensor(targets)
    return input_ids, labels


def sampler(encoded: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int):
    """A function of a torch.Generator giving a random batch `(input_ids, labels)` of `encoded`."""

    def sample(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randint(0, len(encoded), (batch_size,), generator=generator).tolist()
        return collate([encoded[r] for r in rows], pad_id)

    return sample


@torch.no_grad()
def evaluate(model, tokenizer, held_out: list[Example], samples: int = 3, batch_size: int = 16) -> Evaluation:
    """Exact-match accuracy and answer loss on `held_out`, and greedy generations for the first `samples`."""
    from qlora_inject.backends.bnb import never_repack
    from qlora_inject.loss import why_not_chunked

    tokenize = _tokenize(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    chunked = why_not_chunked(model) is None                  # then the head runs on the answer positions only
    never_repack(model)                                      # eval mode must not make bare 4-bit layers untrainable
    was_training = model.training
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    encoded = encode(held_out, tokenize)
    for start in range(0, len(encoded), batch_size):
        input_ids, labels = collate(encoded[start:start + batch_size], pad_id)
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)   # token t predicts t + 1
        answer = targets != IGNORE_INDEX                                              # (batch, tokens)
        if chunked:
            hidden = model.get_decoder()(input_ids=input_ids.to(device)).last_hidden_state
            logits = model.get_output_embeddings()(hidden[answer.to(device)]).float().cpu()   # (answer tokens, vocab)
        else:
            logits = model(input_ids=input_ids.to(device)).logits[answer.to(device)].float().cpu()
        wanted = targets[answer]
        loss_sum += float(torch.nn.functional.cross_entropy(logits, wanted, reduction="sum"))
        count += len(wanted)
        hits = torch.ones_like(targets, dtype=torch.bool)
        hits[answer] = logits.argmax(-1) == wanted
        correct += int(hits.all(dim=1).sum())
    shown = generate(model, tokenizer, [item.prompt for item in held_out[:samples]]) if samples else []
    model.train(was_training)
    return Evaluation(correct / len(held_out), loss_sum / max(count, 1),
                      [(_date_of(item), item.answer.strip(), text)
                       for item, text in zip(held_out[:len(shown)], shown, strict=True)])


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 12) -> list[str]:
    """Greedy continuations of `prompts` (one left-padded batch), each up to its first newline."""
    tokenize = _tokenize(tokenizer)
    device = next(model.parameters()).device
    stop = [tokenizer.eos_token_id, *tokenize("\n")]
    rows = [tokenize(prompt) for prompt in prompts]
    width = max(len(row) for row in rows)
    ids = torch.tensor([[stop[0]] * (width - len(row)) + row for row in rows], device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
    output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=stop, pad_token_id=stop[0])
    texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return [text.split("\n")[0].strip() for text in texts]


def before_after_table(before: Evaluation, after: Evaluation, held_out_size: int) -> str:
    """A markdown table of the held-out scores and the sample generations, before and after training."""
    lines = ["| held-out (" f"{held_out_size} dates) | before | after |", "|---|---|---|",
             f"| exact match | {before.accuracy:.0%} | {after.accuracy:.0%} |",
             f"| answer loss | {before.loss:.3f} | {after.loss:.3f} |",
             f"| answer perplexity | {before.perplexity:.2f} | {after.perplexity:.2f} |",
             "", "| date | expected | before | after |", "|---|---|---|---|"]
    for (date, expected, old), (_, _, new) in zip(before.samples, after.samples, strict=True):
        lines.append(f"| {date} | {expected} | {_cell(old)} | {_cell(new)} |")
    return "\n".join(lines)


def _tokenize(tokenizer) -> Callable[[str], list[int]]:
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def _date_of(item: Example) -> str:
    return item.prompt.removeprefix("Date: ").removesuffix("\nYYYY-MM-DD:")


def _cell(text: str) -> str:
    return repr(text) if text else "(nothing)"
