# %% [markdown]
# # Chapter 8, worked answers

# %%
# requires: weights  (the vocabulary and merges come from the SmolLM2 file)
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tutorials/, where course.py is
import course  # noqa: F401  first, before NumPy loads: thread settings

from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers

from minillm.gguf import GGUFFile
from minillm.registry import resolve_model
from minillm.tokenizer import Tokenizer

metadata = GGUFFile(resolve_model(None)).metadata
tokenizer = Tokenizer.from_metadata(metadata)
TOKENS = metadata["tokenizer.ggml.tokens"]

# %% [markdown]
# ## 1. Digits on their own
#
# Here the two give the same tokens. SmolLM2's tokenizer was trained with the digit step: no word it
# learned merges from ever held two digits, so the vocabulary has only the ten single digits and not
# one merge rule with a digit in it. Without the step, the regex keeps " 2024" and "14159" whole, but
# no rule can join their characters, so they still fall apart into single digits. The step matters
# at training time: it is why every number is its digits, one token each, the same pattern for
# every number (GPT-2's vocabulary, trained without it, holds many multi-digit tokens, so numbers
# split unevenly), which helps a small model count and calculate.

# %%
vocab = {token: i for i, token in enumerate(TOKENS)}
merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
regex_only = RustTokenizer(models.BPE(vocab=vocab, merges=merges))
regex_only.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
TEXT = "In 2024, pi was 3.14159"
with_digits = tokenizer.encode(TEXT)
without = regex_only.encode(TEXT).ids
print("digits alone:", [TOKENS[i] for i in with_digits])
print("regex only:  ", [TOKENS[i] for i in without])
DIGITS = set("0123456789")  # not str.isdigit: the byte characters "²" and "¹" stand for other bytes
with_a_digit = [t for t in TOKENS if DIGITS & set(t)]
digit_rules = [m for m in merges if DIGITS & set("".join(m))]
print(f"tokens with a digit: {with_a_digit}; merge rules with a digit: {len(digit_rules)}")
assert with_digits == without and sorted(with_a_digit) == list("0123456789") and not digit_rules
del vocab, merges

# %% [markdown]
# ## 2. Decoding each token on its own
#
# Every token that ends inside a character decodes to U+FFFD, the replacement character, and the
# token that finishes it decodes its lone continuation bytes to more of them: the reader sees "�"
# where the emoji and the Japanese characters should be, though the ids are right.

# %%
TEXT = "Alice 🐇 said: «Größe? 大きさ!» 🍄🍰"
ids = tokenizer.encode(TEXT)
naive = "".join(tokenizer.token_bytes(i).decode("utf-8", errors="replace") for i in ids)
print("naive:   ", naive)
stream = tokenizer.stream()
streamed = "".join(stream.push(i) for i in ids) + stream.flush()
print("streamed:", streamed)
assert naive != TEXT and "\ufffd" in naive and streamed == TEXT

# %% [markdown]
# ## 3. A byte with no token
#
# minillm (like the `tokenizers` library) drops such a byte before merging, so the characters on both
# sides may merge with each other: "!\x16!" becomes the one token "!!". llama.cpp keeps the byte
# through the merges and drops it afterwards, so the two "!" stay apart. Either way the byte is gone:
# decoding gives "!!" back, not the text that went in.

# %%
TEXT = "!\x16!"
ids = tokenizer.encode(TEXT)
llama_cpp_like = tokenizer.encode("!") + tokenizer.encode("!")   # merged on each side of the byte only
print(f"{TEXT!r}: minillm {[TOKENS[i] for i in ids]}, llama.cpp {[TOKENS[i] for i in llama_cpp_like]}; "
      f"decoded: {tokenizer.decode(ids)!r}")
assert tokenizer.decode(ids) == "!!" != TEXT and ids != llama_cpp_like
