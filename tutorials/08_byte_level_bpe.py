# %% [markdown]
# # Chapter 8: Byte-level BPE, from text to token ids and back
#
# **The question.** Chapter 1 let the tokenizer turn "The capital of France is" into five ids without
# asking how. SmolLM2's vocabulary has 49,152 tokens; any text at all, in any script, with emoji
# and typos, must come out as ids from that list, and the ids must turn back into exactly the same
# text, even when the model emits them one at a time and a character is split between two of them.
# How?
#
# **The idea.** GPT-2's byte-level byte-pair encoding, in three steps, and decoding backwards:
#
# | step | what it does | "Alice's 2 cats 🐈" becomes |
# |---|---|---|
# | pre-tokenize | cut the text into words with a regex: letters, digits (each alone), punctuation, spaces; a leading space stays with its word | `Alice` `'s` ` ` `2` ` cats` ` 🐈` |
# | bytes to characters | encode each word as UTF-8 and write every byte as one printable character ("Ġ" is a space) | `Alice` `'s` `Ġ` `2` `Ġcats` `ĠðŁĲĪ` |
# | merge | start from single characters; repeatedly join the adjacent pair whose rule comes first in the ranked merge list, until no rule applies | `Alice` `'s` `Ġ` `2` `Ġcats` `ĠðŁ` `Ĳ` `Ī` |
# | decode | token -> its bytes, all bytes -> UTF-8 | the same text |
#
# Every one of the 256 bytes has a character, and the vocabulary holds (nearly) all of them, so no text
# is ever "unknown". The merges, learned from data, make common words a single token. The file
# carries both lists: `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`. `minillm/tokenizer.py`
# is the library's version.

# %%
# requires: weights  (the vocabulary and merges come from the SmolLM2 file's metadata)
import course  # first, before NumPy loads: thread settings, figures, timing (tutorials/course.py)

import re
import time
import tracemalloc

from tokenizers import pre_tokenizers

from minillm.gguf import GGUFFile
from minillm.registry import resolve_model
from minillm.tokenizer import Tokenizer, bytes_to_unicode

metadata = GGUFFile(resolve_model(None)).metadata
tokenizer = Tokenizer.from_metadata(metadata)
TOKENS, MERGES = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.merges"]
ALICE = course.ALICE.read_text(encoding="utf-8")
print(f"{len(TOKENS):,} tokens, e.g. {TOKENS[1000:1004]}; {len(MERGES):,} merges, first {MERGES[:3]}")
print(f"pre-tokenizer {metadata['tokenizer.ggml.pre']!r}; Alice: {len(ALICE):,} characters")

# %% [markdown]
# ## 1. Pre-tokenizing
#
# SmolLM2's pre-tokenizer (`tokenizer.ggml.pre = "smollm"`) first cuts every digit out on its own, then
# applies GPT-2's regex:
#
#     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
#
# Python's `re` has no `\p{L}` (any letter) or `\p{N}` (any numeral). For letters, `[^\W\d_]` says "a
# word character that is not a digit or the underscore", close to `\p{L}`; it differs on rare
# characters (`²` or `①` count as letters there, numerals in `\p{N}`). minillm uses the `tokenizers`
# library's pre-tokenizer, which has the real classes; on Alice (plain ASCII) ours must cut the same
# words.

# %%
WORD = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


def split_words(text):
    """The words of `text`: every digit alone, then GPT-2's regex on what lies between."""
    words = []
    for piece in re.split(r"(\d)", text):  # the capturing group keeps each digit as a piece
        words += WORD.findall(piece)
    return words


print(split_words("Alice's 2 cats 🐈 sat   down."))
smollm = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
BYTE_CHAR = bytes_to_unicode()  # byte -> printable character


def byte_chars(word):
    return "".join(BYTE_CHAR[b] for b in word.encode("utf-8"))


words = [byte_chars(word) for word in split_words(ALICE)]
assert words == [word for word, _ in smollm.pre_tokenize_str(ALICE)]
print(f"Alice: {len(words):,} words, {len(set(words)):,} different ones")

# %% [markdown]
# ## 2. Bytes as characters
#
# Why not merge bytes directly? The merge list is text (`"Ġ t"` joins `Ġ` and `t`), and GPT-2 wanted
# every token to be printable. So the 188 printable Latin-1 bytes stand for themselves and the other
# 68 (controls, the space, ...) are moved, in byte order, to the characters from U+0100 on. We build
# the table by hand and compare.

# %%
printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
table = {b: chr(b) for b in printable}
for n, b in enumerate(b for b in range(256) if b not in table):
    table[b] = chr(256 + n)
assert table == BYTE_CHAR
print({chr(b) if b > 32 else hex(b): table[b] for b in (0x0A, 0x20, ord("A"), 0xF0)})
vocabulary = set(TOKENS)
missing = [b for b in range(256) if table[b] not in vocabulary]
print(f"bytes with no token of their own in this vocabulary: {[hex(b) for b in missing]}")

# %% [markdown]
# Six ASCII controls are missing, and bytes that valid UTF-8 never contains (0xC0, 0xC1, 0xF5 and up) or
# that only unassigned planes would use (0xF1, 0xF2): the training data never had them. A text with
# one of them cannot survive the round trip (exercise 3).

# %% [markdown]
# ## 3. The merge loop
#
# The merge rules are ranked: rule 0 was the most frequent pair in the training data. To encode a
# word, start from its characters and, while some adjacent pair has a rule, join the pair with the
# lowest rank (the leftmost, among equals). The pieces left are tokens; their positions in the
# vocabulary are the ids. (A rule listed twice counts at its first place, as in llama.cpp.)

# %%
VOCAB = {token: i for i, token in enumerate(TOKENS)}
RANKS = {}
for rank, merge in enumerate(MERGES):
    RANKS.setdefault(tuple(merge.split(" ")), rank)
NO_RULE = len(MERGES)


def merge_word(word, steps=None):
    """Token ids of one word of byte characters; `steps`, a list, receives the pieces after each merge."""
    pieces = [ch for ch in word if ch in VOCAB]  # a byte with no token is dropped, as minillm does
    while len(pieces) > 1:
        rank, i = min((RANKS.get(pair, NO_RULE), i) for i, pair in enumerate(zip(pieces, pieces[1:])))
        if rank == NO_RULE:
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
        if steps is not None:
            steps.append((list(pieces), rank))
    return [VOCAB[piece] for piece in pieces]


def encode(text):
    """Token ids of `text`; each different word is merged once."""
    merged = {}
    ids = []
    for word in split_words(text):
        word = byte_chars(word)
        if word not in merged:
            merged[word] = merge_word(word)
        ids += merged[word]
    return ids


start = time.perf_counter()
ours = encode(ALICE)
ours_s = time.perf_counter() - start
start = time.perf_counter()
library = tokenizer.encode(ALICE)
library_s = time.perf_counter() - start
assert ours == library
print(f"all of Alice: {len(ours):,} ids, equal to minillm's; {len(ALICE) / len(ours):.2f} characters per token")
print(f"time: ours {ours_s:.2f} s, minillm {library_s:.2f} s")

# %% [markdown]
# One word, merge by merge:

# %%
WORD_SHOWN = byte_chars(" Wonderland")
steps = [(list(WORD_SHOWN), None)]
merge_word(WORD_SHOWN, steps)
fig, ax = course.figure(8, 3.6)
for row, (pieces, rank) in enumerate(steps):
    at = 0
    for piece in pieces:
        ax.broken_barh([(at, len(piece))], (row - 0.4, 0.8), facecolor="tab:blue", alpha=0.25, edgecolor="tab:blue")
        ax.text(at + len(piece) / 2, row, piece, ha="center", va="center", fontsize=8)
        at += len(piece)
    ax.text(at + 0.3, row, "characters" if rank is None else f"rule {rank}: {MERGES[rank]!r}", va="center", fontsize=7)
ax.set_xlim(0, len(WORD_SHOWN) + 6)
ax.set_ylim(len(steps) - 0.5, -0.5)
ax.set_xticks(range(len(WORD_SHOWN) + 1))
ax.set_xlabel("byte of the word ' Wonderland' (Ġ is the space)")
ax.set_ylabel("merges done")
ax.set_title(f"Byte-pair merges of one word: {len(WORD_SHOWN)} characters to {len(steps[-1][0])} tokens")
ax.grid(False)
course.save(fig, "bpe_merges.png")

# %% [markdown]
# ![The merges that turn ' Wonderland' from 11 characters into tokens, with the rule applied at each step](figures/bpe_merges.png)
#
# Each step joins the pair with the lowest-ranked rule anywhere in the word, so common fragments
# ("er", "on") form first and the word's rarer joins come last.
#
# ## 4. Decoding, one token at a time
#
# A token's text is the bytes its characters stand for; the text of several tokens is their bytes
# joined, decoded as UTF-8. While generating, though, tokens come one by one, and a character of two
# to four bytes may be split between tokens: print each token's bytes as they come and the reader
# sees replacement characters. A streaming decoder holds back the bytes of an unfinished character.
# In UTF-8 the first byte of a character says how many follow: `0xxxxxxx` none, `110xxxxx` one,
# `1110xxxx` two, `11110xxx` three; the following bytes are `10xxxxxx`.

# %%
CHAR_OF_BYTE = {ch: b for b, ch in BYTE_CHAR.items()}


def token_bytes(token_id):
    token = TOKENS[token_id]
    if all(ch in CHAR_OF_BYTE for ch in token):
        return bytes(CHAR_OF_BYTE[ch] for ch in token)
    return token.encode("utf-8")  # a special token such as <|im_end|> stands for its own text


def complete_length(buffer):
    """How many leading bytes of `buffer` form whole characters (what follows is an unfinished one)."""
    for back in range(1, min(4, len(buffer)) + 1):
        lead = buffer[-back]
        if lead >> 6 != 0b10:  # not a continuation byte: this is where the last character starts
            length = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4
            return len(buffer) if back >= length else len(buffer) - back
    return len(buffer)


class StreamDecoder:
    def __init__(self):
        self.held = b""

    def push(self, token_id):
        """The text this token completes (maybe empty)."""
        self.held += token_bytes(token_id)
        n = complete_length(self.held)
        text, self.held = self.held[:n].decode("utf-8", errors="replace"), self.held[n:]
        return text


TEXT = "Alice 🐇 said: «Größe? 大きさ!» 🍄🍰"
ids = tokenizer.encode(TEXT)
assert ids == encode(TEXT)
ours, theirs = StreamDecoder(), tokenizer.stream()
print(f"{'id':>6}  {'bytes':<14} {'naive':<8} {'streamed':<10}")
for token_id in ids:
    piece = ours.push(token_id)
    assert piece == theirs.push(token_id)
    raw = token_bytes(token_id)
    print(f"{token_id:6}  {raw.hex(' '):<14} {raw.decode('utf-8', errors='replace')!r:<8} {piece!r}")
decoder = StreamDecoder()
assert "".join(decoder.push(i) for i in ids) == TEXT == tokenizer.decode(ids)

# %% [markdown]
# ## 5. Measurements: the tables' memory
#
# Our version holds the vocabulary and the merge rules as Python dicts of strings. minillm holds the
# merge rules as sorted int64 pair keys with ranks (NumPy) and every token's bytes in one bytes object
# with offsets, and builds no string dict at all. `tracemalloc` counts what each holds.

# %%
def held_by(build):
    """Bytes that the object built by `build()` keeps allocated, as tracemalloc counts them."""
    tracemalloc.start()
    built = build()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del built
    return held


def dict_tables():
    ranks = {}
    for rank, merge in enumerate(MERGES):
        ranks.setdefault(tuple(merge.split(" ")), rank)
    return {token: i for i, token in enumerate(TOKENS)}, ranks


MiB = 1 << 20
held = {"Python dicts (this chapter)": held_by(dict_tables),
        "minillm Tokenizer (NumPy tables)": held_by(lambda: Tokenizer.from_metadata(metadata))}
for name, nbytes in held.items():
    print(f"{name:34} {nbytes / MiB:6.1f} MiB")
assert held["minillm Tokenizer (NumPy tables)"] < held["Python dicts (this chapter)"] / 4

fig, ax = course.figure(6, 2.4)
ax.barh(list(held), [nbytes / MiB for nbytes in held.values()], color=["tab:gray", "tab:blue"])
ax.set_xlabel("MiB held (tracemalloc), beyond the metadata's own lists")
ax.set_ylabel("tables")
ax.set_title(f"Vocabulary ({len(TOKENS):,}) and merge rules ({len(MERGES):,}) in memory")
course.save(fig, "tokenizer_memory.png")

# %% [markdown]
# ![Memory held by the vocabulary and merge tables as Python dicts and as minillm's NumPy tables](figures/tokenizer_memory.png)
#
# Under a memory cap (chapter 7) the tokenizer is a line of the plan, and this is why it is arrays:
# a dict of 49,152 strings costs about a hundred bytes per entry in CPython, a sorted int64 key eight.
#
# ## Exercises
#
# Worked answers: `tutorials/solutions/08_byte_level_bpe.py`.
#
# 1. Encode `"In 2024, pi was 3.14159"` with the digit step and with the regex alone. Do the tokens
#    differ? Count the vocabulary's tokens and merge rules that contain a digit, and explain what the
#    digit step did when SmolLM2's tokenizer was trained.
# 2. Decode the ids of the emoji text of section 4 one token at a time with
#    `bytes.decode(errors="replace")` and join the pieces: what does a reader of a streamed answer see?
# 3. Six ASCII control bytes have no token in this vocabulary (section 2). Encode a text containing
#    one of them and decode the ids: what comes back, and what does llama.cpp do instead
#    (`minillm/tokenizer.py`, `Tokenizer.encode`)?
