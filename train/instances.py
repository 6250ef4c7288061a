"""MetaICL instances: k demonstrations of one task + a query, as token ids with a target-only label mask.

Layout (DESIGN.md, "Data"), direct method, x = input, y = output:

    x_1 "\n" y_1 "\n\n\n" x_2 "\n" y_2 "\n\n\n" ... x_k "\n" y_k "\n\n\n" x_q "\n" [target]

Channel swaps the roles inside every example (y "\n" x), so the model scores P(input | output): the query
becomes `option "\n" [x_q]` and the target is the query input.

Every piece is tokenized on its own (no special tokens) and the ids are concatenated, so the target's
tokens are exactly the tokens of the target string wherever it sits. Lengths:
- one example (x, "\n", y) is at most `max_example_len` tokens: the input is cut first (its end), then,
  if still too long, the output (its end); in channel the input is still the one cut first;
- the whole sequence is at most `max_len` tokens: the oldest tokens are dropped (left truncation).
The "\n\n\n" separators count toward `max_len` only.

Only the first `max_example_len` tokens of a text can survive, so a long text is cut before it is tokenized
(a 20 MB line would otherwise take minutes and gigabytes): `_ids` tokenizes a prefix of the characters, long
enough to give a margin of tokens past the limit, and widens it until it does. Tokenizers merge only locally,
so the first tokens of the prefix are those of the whole text.
"""
from __future__ import annotations

from typing import Sequence

import torch

IGNORE_INDEX = -100
NEWLINE = "\n"
SEPARATOR = "\n\n\n"


PREFIX_MARGIN = 64  # tokens tokenized past the limit: the last ones of a cut text may differ from the full text's


def _ids(tokenizer, text: str, limit: int | None = None) -> list[int]:
    """Token ids of `text`; with `limit`, ids whose first `limit` equal those of the whole text (there may be
    more, the caller cuts), computed from a prefix of the text when it is long."""
    if not text:
        return []
    if limit is not None:
        chars = 8 * (limit + PREFIX_MARGIN)  # most tokens are a few characters; widened below if not enough
        while chars < len(text):
            ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
            if len(ids) >= limit + PREFIX_MARGIN:
                return list(ids)
            chars *= 4
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _fit_example(x: list[int], nl: list[int], y: list[int], max_example_len: int) -> tuple[list[int], list[int]]:
    """Cut x (then y) at their ends so that len(x) + len(nl) + len(y) <= max_example_len."""
    room = max_example_len - len(nl)
    if room <= 0:
        raise ValueError(f"max_example_len={max_example_len} leaves no room next to the {len(nl)}-token separator")
    if len(x) + len(y) > room:
        x = x[:max(0, room - len(y))]
        y = y[:room - len(x)]
    return x, y


def encode_parts(tokenizer, demos: Sequence[dict], query: dict, *, method: str = "direct",
                 max_example_len: int = 256, target: str | None = None) -> tuple[list[int], list[int], list[int]]:
    """Return (context, condition, target) ids before whole-sequence truncation.

    context = the demonstrations and their separators (shared by every option of a query);
    condition = what precedes the target in the query example (direct: input "\\n"; channel: option "\\n");
    target = the scored tokens (direct: the option; channel: the query input).
    """
    context = encode_context(tokenizer, demos, method=method, max_example_len=max_example_len)
    cond, tgt = encode_query(tokenizer, query, method=method, max_example_len=max_example_len, target=target)
    return context, cond, tgt


def _check_method(method: str) -> None:
    if method not in ("direct", "channel"):
        raise ValueError(f"method must be 'direct' or 'channel', got {method!r}")


def encode_context(tokenizer, demos: Sequence[dict], *, method: str = "direct",
                   max_example_len: int = 256) -> list[int]:
    """The demonstrations, each followed by the separator "\\n\\n\\n"."""
    _check_method(method)
    nl, sep = _ids(tokenizer, NEWLINE), _ids(tokenizer, SEPARATOR)
    context: list[int] = []
    for demo in demos:
        x, y = _fit_example(_ids(tokenizer, demo["input"], max_example_len), nl,
                            _ids(tokenizer, demo["output"], max_example_len), max_example_len)
        first, second = (x, y) if method == "direct" else (y, x)
        context += first + nl + second + sep
    return context


def encode_query(tokenizer, query: dict, *, method: str = "direct", max_example_len: int = 256,
                 target: str | None = None) -> tuple[list[int], list[int]]:
    """(condition, target) ids of the query example; target defaults to the query's output."""
    _check_method(method)
    nl = _ids(tokenizer, NEWLINE)
    out = query["output"] if target is None else target
    x, y = _fit_example(_ids(tokenizer, query["input"], max_example_len), nl, _ids(tokenizer, out, max_example_len),
                        max_example_len)
    if method == "direct":
        return x + nl, y
    return y + nl, x


def build_instance(tokenizer, demos: Sequence[dict], query: dict, *, method: str = "direct",
                   max_example_len: int = 256, max_len: int = 1024, target: str | None = None) -> dict:
    """One training/scoring sequence: {"input_ids": [...], "labels": [...]} (labels -100 outside the target)."""
    context, cond, tgt = encode_parts(tokenizer, demos, query, method=method,
                                      max_example_len=max_example_len, target=target)
    if not tgt:
        raise ValueError(f"empty target for query {query.get('input', '')[:60]!r} (method={method}): "
                         "nothing to score")
    ids = context + cond + tgt
    labels = [IGNORE_INDEX] * (len(context) + len(cond)) + tgt
    if len(ids) > max_len:  # left truncation: keep the query and the most recent demonstrations
        ids, labels = ids[-max_len:], labels[-max_len:]
    return {"input_ids": ids, "labels": labels}


def collate(instances: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of instances into an HF batch: input_ids, attention_mask, labels (-100 at pads)."""
    if not instances:
        raise ValueError("collate: empty list of instances")
    if pad_token_id is None:
        raise ValueError("collate: pad_token_id is None (set tokenizer.pad_token, e.g. to eos)")
    T = max(len(inst["input_ids"]) for inst in instances)
    B = len(instances)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for i, inst in enumerate(instances):
        n = len(inst["input_ids"])
        if len(inst["labels"]) != n:
            raise ValueError(f"collate: instance {i} has {n} input_ids but {len(inst['labels'])} labels")
        input_ids[i, :n] = torch.tensor(inst["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(inst["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
