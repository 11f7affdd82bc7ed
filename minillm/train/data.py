"""Training data: token windows cut from text files, chat examples scored on the answer, and the
order they are drawn in (deterministic for a seed).

A text becomes windows of `window` tokens side by side: the model reads each and is scored on
predicting every next token. A chat example is one conversation in the
model's chat template; only the assistant's tokens (its answer and the end-of-turn token that stops
it) count in the loss, the rest is context.
"""

import json
from pathlib import Path

import numpy as np

from ..errors import MinillmError
from .grad import Example


def read_texts(paths) -> str:
    """The files' text, joined by blank lines; a one-line error for a file that cannot be read."""
    parts = []
    for path in paths:
        try:
            parts.append(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise MinillmError(f"cannot read {path}: {err}") from None
    return "\n\n".join(parts)


def text_windows(tokens, window: int) -> list[Example]:
    """Every whole window of a token sequence (n,): window k reads tokens[k*window : (k+1)*window]
    and predicts the tokens one further on, so neighbouring windows share one boundary token."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n = (len(tokens) - 1) // window
    if n < 1:
        raise MinillmError(f"the text is {len(tokens)} tokens, too short for one window of {window} + 1")
    return [Example(ids=tokens[k * window:(k + 1) * window], targets=tokens[k * window + 1:(k + 1) * window + 1])
            for k in range(n)]


def split_held_out(examples: list, fraction: float) -> tuple[list, list]:
    """The last `fraction` of the examples (at least one) held out for evaluation, the rest for training."""
    if not 0 < fraction < 1:
        raise MinillmError(f"the held-out fraction must be in (0, 1), got {fraction}")
    n_held = max(1, round(len(examples) * fraction))
    if n_held >= len(examples):
        raise MinillmError(f"{len(examples)} examples are too few to hold {fraction:.0%} out and train on the rest")
    return examples[:-n_held], examples[-n_held:]


def batches(examples: list, batch_size: int, seed: int):
    """Endless batches of `batch_size` examples: each epoch in a new random order drawn from one
    np.random.Generator seeded with `seed`, so a seed gives the same batches every run."""
    rng = np.random.default_rng(seed)
    order = []
    while True:
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(rng.permutation(len(examples)))
            batch.append(examples[order.pop()])
        yield batch


def read_chat_jsonl(path) -> list[list[dict]]:
    """One conversation a line: {"messages": [{"role": ..., "content": ...}, ...]} (OpenAI's and
    Hugging Face's chat format) with at least one assistant message. Anything else is a one-line
    error naming the line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise MinillmError(f"cannot read {path}: {err}") from None
    conversations = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise MinillmError(f"{path}:{number}: not JSON ({err.msg})") from None
        conversations.append(checked_messages(record, f"{path}:{number}"))
    if not conversations:
        raise MinillmError(f"{path}: no conversations")
    return conversations


def checked_messages(record, where: str) -> list[dict]:
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise MinillmError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise MinillmError(f"{where}: each message needs a role (system, user or assistant) and a string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise MinillmError(f"{where}: no assistant message to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def chat_example(tokenizer, messages: list[dict], max_tokens: int) -> Example:
    """The conversation in the chat template, scored on every assistant message: its tokens are the
    rendered conversation up to it (with the template's assistant header) against the rendering
    that includes it. Needs a template that only appends (ChatML does); longer than max_tokens + 1
    tokens is an error rather than a silent cut."""
    ids, scored = [], []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.encode_chat(messages[:i], add_generation_prompt=True)
        after = tokenizer.encode_chat(messages[:i + 1], add_generation_prompt=False)
        if after[:len(before)] != before or before[:len(ids)] != ids:
            raise MinillmError("the model's chat template does not render a conversation by appending messages")
        scored += [0] * (len(before) - len(ids)) + [1] * (len(after) - len(before))
        ids = after
    if len(ids) - 1 > max_tokens:
        raise MinillmError(f"a conversation is {len(ids)} tokens, more than the context of {max_tokens} + 1")
    ids = np.asarray(ids, dtype=np.int64)
    return Example(ids=ids[:-1], targets=ids[1:], weights=np.asarray(scored[1:], np.float32))


def pack(examples: list, parts: int, max_tokens: int) -> list[Example]:
    """The examples joined into about `parts` windows of similar length (each at most max_tokens
    long), to be run one window a thread: every linear then multiplies a whole window at once
    (for a packed base, one dequantization of each tile per window instead of per example). Each
    example keeps its own positions in the loss and sees only itself (tape.Segmented).
    Longest first, each into the shortest window so far that it fits."""
    bins, sizes = [[] for _ in range(max(1, parts))], [0] * max(1, parts)
    for ex in sorted(examples, key=lambda e: -len(e.ids)):
        fitting = [i for i in range(len(bins)) if sizes[i] + len(ex.ids) <= max_tokens]
        if not fitting:
            bins.append([])
            sizes.append(0)
            fitting = [len(bins) - 1]
        best = min(fitting, key=lambda i: sizes[i])
        bins[best].append(ex)
        sizes[best] += len(ex.ids)
    return [joined(b) for b in bins if b]


def joined(examples: list) -> Example:
    """One window holding the examples one after another (their ids, targets and weights)."""
    return Example(ids=np.concatenate([e.ids for e in examples]), targets=np.concatenate([e.targets for e in examples]),
                   weights=np.concatenate([e.position_weights for e in examples]),
                   segments=tuple(len(e.ids) for e in examples))
