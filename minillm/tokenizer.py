"""Text <-> token ids for the byte-level BPE vocabulary stored in a GGUF file, and the chat template.

Byte-level BPE (GPT-2's scheme, used by SmolLM2) turns text into ids in three steps:

1. Pre-tokenize: cut the text into words with a regex (letters, digits, punctuation and
   whitespace runs apart; a leading space stays with the word it precedes). Merges never cross
   a word boundary.
2. Byte-level alphabet: encode each word as UTF-8 and write every byte as one printable
   character (GPT-2's `bytes_to_unicode` table below: "Ġ" is a space, "Ċ" a newline). Any text
   becomes a string over 256 symbols, so a vocabulary holding all 256 never needs an "unknown"
   token (SmolLM2's lacks a few rare bytes: see `Tokenizer.encode`).
3. BPE: start from single symbols and keep merging the adjacent pair whose rule comes first in
   the ranked merge list (`tokenizer.ggml.merges`, "Ġ t" before "Ġ a" ...) until no rule
   applies. Each remaining piece is a vocabulary entry, and its index is the token id.

Decoding runs backwards: token ids -> bytes -> UTF-8. One character can span several
tokens (an emoji is 4 bytes, often 2 or 3 tokens), so `StreamDecoder` holds back the bytes of
an unfinished character instead of printing a replacement character.

Who does what: step 1 is the `tokenizers` library's pre-tokenizer (its regex needs \\p{L} and
\\p{N}, which Python's `re` lacks); steps 2 and 3 and decoding run here, on NumPy tables built
from the GGUF metadata: the merge rules as sorted int64 pair keys (`MergeTable`) and the bytes of
every token in one bytes object. For SmolLM2 they hold ~1.3 MiB; a `tokenizers` BPE model, with
the Python lists and dicts it is built from, held ~28 MiB. The tests check the ids against
llama.cpp's, and against a `tokenizers` BPE built from the same metadata.
"""

import codecs
import heapq
import re
from functools import cached_property, lru_cache

import numpy as np
from tokenizers import Regex, pre_tokenizers

from . import metadata as typed
from .errors import MinillmError
from .gguf import join_with_offsets
from .template import ChatTemplate

CONTROL = 3  # tokenizer.ggml.token_type of special tokens such as <|im_start|> (llama.cpp's LLAMA_TOKEN_TYPE_CONTROL)
# Tokens that end a turn, found by their text as llama.cpp finds its end-of-generation tokens (it
# also makes them control tokens, whatever type the file gives them)
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>")
WORD_CACHE = 4096  # words whose merged ids encode remembers (~0.5 MiB when full)
PIECE_CHARS = 4096  # encode pre-tokenizes long text this many characters at a time (see text_pieces)
_CUT = re.compile(r"\S ")  # a space after a character that is not whitespace: cut between them

# A noncharacter ("not for interchange"): encode_chat inserts it into special-token strings typed
# in message text, so that only the template's own special tokens survive rendering intact.
# (A template that wrote this character itself would lose it; none is known to.)
_MARK = "\ufdd0"
_MARK_OR_ESCAPED_MARK = re.compile(_MARK + "(" + _MARK + "?)")


def _pre_tokenizer(pre: str):
    """The `tokenizers` pre-tokenizer for a `tokenizer.ggml.pre` value.

    "smollm" follows HF's SmolLM2 tokenizer.json: every digit on its own, then the GPT-2
    byte-level regex  's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
    llama.cpp (src/llama-vocab.cpp) maps "smollm" to LLAMA_VOCAB_PRE_TYPE_SMOLLM, which shares
    its regex list with codeshell/exaone/minerva: "\\p{N}" (each numeric character a piece), then
    the GPT-2 regex above without the final "|\\s+" (llama.cpp keeps unmatched text as a piece
    of its own, so the split is the same); it also sets clean_spaces = false, which only
    matters when decoding with llama.cpp's own space clean-up, not here. The ids agree with
    llama.cpp on tests/data/tokenizer_corpus.json except for the missing-byte case described
    in `Tokenizer.encode`. (transformers' GGUF loader drops the digit step, and so differs on
    numerals that are not ASCII digits, such as " ①" or " ٣".)
    """
    if pre == "smollm":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre == "qwen2":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_WORDS), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise MinillmError(f"unsupported tokenizer.ggml.pre {pre!r}: minillm knows 'smollm' and 'qwen2'")


# Qwen 2 and 3's words (their tokenizer.json; llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2 spells the
# case-insensitive contractions out): letters with one leading non-letter, single digits,
# punctuation runs with the newlines after them, newline runs, other whitespace.
QWEN2_WORDS = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def text_pieces(text: str, size: int = PIECE_CHARS):
    """`text` in consecutive pieces of about `size` characters (more when no cut point comes),
    each cut just before a space that follows a non-space character. The pre-tokenizer splits
    the pieces into the same words as the whole text: no pattern of its regex (smollm's or
    qwen2's) matches a non-space character followed by a space (" ?\\p{L}+" and the like take a
    space only in front), so a word always ends there, and the regex looks at no text before a match.
    Pre-tokenizing a long text whole would hold a Python tuple per word at once (~18 MiB for a
    150 kB book), and CPython keeps much of that memory after it is freed."""
    start = 0
    while len(text) - start > size:
        cut = _CUT.search(text, start + size)
        if cut is None:
            break
        yield text[start:cut.start() + 1]
        start = cut.start() + 1
    yield text[start:]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other
    68 bytes (controls, space, ...) are moved to U+0100 onwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return table


def _token_bytes_table(tokens) -> tuple[bytes, np.ndarray]:
    """The bytes each token stands for, all in one bytes object: token i is
    blob[offsets[i]:offsets[i + 1]]. A token with a character outside the byte alphabet is taken
    as its own UTF-8 text, as the `tokenizers` ByteLevel decoder does."""
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}

    def token_bytes(token: str) -> bytes:
        if all(ch in byte_of for ch in token):
            return bytes(byte_of[ch] for ch in token)
        return token.encode("utf-8")
    return join_with_offsets(map(token_bytes, tokens), len(tokens))


class TokenIndex:
    """Token string -> id, without a dict of the vocabulary's strings.

    A dict {str: id} of SmolLM2's 49k tokens holds ~8 MiB while it exists, and CPython keeps
    2-3 MiB of that after it is freed (its allocator for small objects returns memory to the
    system only in whole 1 MiB arenas, and the strings are spread over many). Here the index is
    the tokens' hashes, sorted (NumPy, 0.8 MiB): `find` looks the hash up by binary search, then
    compares the strings, since different strings can share a hash. Each token string exists only
    while it is hashed or compared.
    """

    def __init__(self, tokens):
        self.tokens = tokens
        hashes = np.fromiter(map(hash, tokens), np.int64, count=len(tokens))  # (vocab,)
        self.ids = np.argsort(hashes, kind="stable")  # (vocab,) ids in hash order; equal hashes by id
        self.hashes = hashes[self.ids]  # (vocab,) ascending

    def find(self, text: str) -> int | None:
        """The id of the first token equal to `text`, or None."""
        h = hash(text)
        at = int(self.hashes.searchsorted(h))
        while at < len(self.hashes) and self.hashes[at] == h:
            token_id = int(self.ids[at])
            if self.tokens[token_id] == text:
                return token_id
            at += 1
        return None

    def has_duplicates(self) -> bool:
        """Whether two tokens are the same string. Only tokens sharing a hash can be: each one
        after the first of its hash is looked up, and a duplicate finds an earlier id."""
        shares_hash = np.flatnonzero(self.hashes[1:] == self.hashes[:-1]) + 1
        return any(self.find(self.tokens[i]) != i for i in self.ids[shares_hash].tolist())


NO_RULE = np.iinfo(np.int32).max  # the rank of a pair no merge rule joins


class MergeTable:
    """The ranked merge rules as NumPy arrays: rule r joins the adjacent tokens (left, right)
    into one token, and a lower r is applied first.

    A pair is one int64 key, left * vocab_size + right. The keys are sorted, with each pair's
    rank and merged token id alongside, so `find` looks up many pairs at once by binary search
    (np.searchsorted). SmolLM2's 48,900 rules take 16 bytes each (~0.8 MiB); a dict of string
    pairs would take ~10 MiB.
    """

    def __init__(self, left: np.ndarray, right: np.ndarray, merged: np.ndarray, vocab_size: int):
        # left, right, merged: (n_rules,) token ids in rank order
        keys = left.astype(np.int64) * vocab_size + right
        # np.unique sorts the keys and gives where each first occurs: its rank. A rule repeated
        # later never applies, as in llama.cpp (`tokenizers` keeps the last of the repeats).
        keys, first = np.unique(keys, return_index=True)
        # A key no pair has, after the last, so every search lands on an entry.
        self.keys = np.append(keys, np.iinfo(np.int64).max)  # (n_pairs + 1,) int64, ascending
        self.ranks = np.append(first, NO_RULE).astype(np.int32)  # (n_pairs + 1,)
        self.merged = np.append(merged[first], -1).astype(np.int32)  # (n_pairs + 1,)
        self.vocab_size = vocab_size

    @classmethod
    def from_strings(cls, merges, index: TokenIndex) -> "MergeTable":
        """From tokenizer.ggml.merges, "Ġ t" -> the ids of "Ġ", "t" and "Ġt". Byte-level tokens
        never contain a space, so one space separates the pair."""
        ids = np.zeros((3, len(merges)), np.int32)  # rows: left, right, merged
        for rank, merge in enumerate(merges):
            pair = merge.split(" ")
            if len(pair) != 2:
                raise MinillmError(f"tokenizer.ggml.merges[{rank}] = {merge!r} is not two tokens")
            for row, token in enumerate([*pair, "".join(pair)]):
                token_id = index.find(token)
                if token_id is None:
                    raise MinillmError(f"tokenizer.ggml.merges[{rank}] = {merge!r} needs the token "
                                       f"{token!r}, which is not in the vocabulary")
                ids[row, rank] = token_id
        return cls(*ids, len(index.tokens))

    def find(self, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rank of the rule joining each pair (NO_RULE where none does) and the token it
        makes. left, right: (n,) int64 -> ranks, merged: (n,) int32."""
        keys = left * self.vocab_size + right
        at = np.searchsorted(self.keys, keys)  # (n,) in [0, n_pairs]: the sentinel catches the rest
        found = self.keys[at] == keys
        return np.where(found, self.ranks[at], NO_RULE), self.merged[at]


class Tokenizer:
    """Encode/decode and chat rendering for one model: what every vocabulary shares (special tokens,
    BOS, the chat template, decoding through a table of each token's bytes). A subclass turns plain
    text into ids: `ByteLevelBPE` here for `tokenizer.ggml.model = "gpt2"`, `minillm.spm.SentencePiece`
    for "llama" (Gemma 3). `Tokenizer.from_metadata` picks the one the file names."""

    def __init__(self, tokens, token_types, token_bytes: tuple[bytes, np.ndarray], bos_id, eos_id, stop_ids, add_bos,
                 chat_template):
        """`tokens`: the vocabulary's strings (read here, not kept); `token_bytes`: (blob, offsets), the
        bytes token i stands for being blob[offsets[i]:offsets[i + 1]]; `stop_ids` end a turn."""
        self.vocab_size = len(tokens)
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.chat_template = chat_template
        self._token_blob, self._token_offsets = token_bytes
        # The texts the chat template is given, not the whole list of token strings.
        self._template_tokens = {i: tokens[i] for i in (bos_id, eos_id) if i is not None}
        # Control tokens are recognised only in text the chat template wrote (see encode_chat).
        self._special_ids = {tokens[i]: i for i, t in enumerate(token_types) if t == CONTROL and tokens[i]}
        by_length = sorted(self._special_ids, key=len, reverse=True)  # longest first: "<a_b>" before "<a>"
        # "(?!)" never matches: the pattern for a vocabulary without control tokens.
        self._special_re = re.compile("|".join(map(re.escape, by_length)) or "(?!)")
        self.stop_ids = frozenset(stop_ids)
        # Text repeats its words: each one is merged once (per instance, so the cache dies with it).
        self._word_ids = lru_cache(maxsize=WORD_CACHE)(self._merge_word)

    @classmethod
    def from_metadata(cls, metadata: dict, path="model") -> "Tokenizer":
        """Build the tokenizer the GGUF metadata describes (`minillm.gguf.GGUFFile(path).metadata`);
        `path` names the file in errors. Every key is read through minillm.metadata, which checks its type."""
        model = typed.get(metadata, "tokenizer.ggml.model", path=path)
        if model == "gpt2":
            return ByteLevelBPE.from_metadata(metadata, path)
        if model == "llama":
            from .spm import SentencePiece
            return SentencePiece.from_metadata(metadata, path)
        raise MinillmError(f"unsupported tokenizer.ggml.model {model!r}: minillm reads 'gpt2' (byte-level BPE) "
                           "and 'llama' (SentencePiece)")

    @staticmethod
    def common_settings(metadata: dict, path="model", add_bos_default: bool = False) -> tuple[dict, "TokenIndex"]:
        """What every vocabulary has, checked: the token strings and types, the special ids, whether a
        BOS is added (`add_bos_default` when the file does not say: llama.cpp's default for the
        vocabulary's kind), the chat template.
        -> keyword arguments of __init__ but the token bytes, and a TokenIndex of the tokens."""
        def get(key, default=None):
            return typed.get(metadata, key, default, path)
        tokens = typed.require(metadata, "tokenizer.ggml.tokens", path)
        token_types = typed.require(metadata, "tokenizer.ggml.token_type", path)
        if len(token_types) != len(tokens):
            raise MinillmError(f"tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens")
        index = TokenIndex(tokens)  # only while building
        if index.has_duplicates():
            raise MinillmError("tokenizer.ggml.tokens lists the same token twice")
        ids = {key: get(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "eot")}
        for key, token_id in ids.items():
            if token_id is not None and not 0 <= token_id < len(tokens):
                raise MinillmError(f"tokenizer.ggml.{key}_token_id {token_id} "
                                   f"is outside the vocabulary of {len(tokens)}")
        add_bos = get("tokenizer.ggml.add_bos_token", add_bos_default)
        if add_bos and ids["bos"] is None:
            raise MinillmError("tokenizer.ggml.add_bos_token is set but there is no tokenizer.ggml.bos_token_id")
        template = get("tokenizer.chat_template")
        named_stops = [i for i in map(index.find, END_OF_TURN) if i is not None]
        stop_ids = {i for i in (ids["eos"], ids["eot"], *named_stops) if i is not None}
        if any(token_types[i] != CONTROL for i in named_stops):  # llama.cpp makes them control tokens too
            token_types = [CONTROL if i in named_stops else t for i, t in enumerate(token_types)]
        return dict(tokens=tokens, token_types=token_types, bos_id=ids["bos"], eos_id=ids["eos"], stop_ids=stop_ids,
                    add_bos=add_bos, chat_template=template), index

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of plain text. Special-token strings in it ("<|im_start|>") are ordinary text."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise MinillmError(f"text is not valid Unicode: {e.reason} at character {e.start}") from None
        ids = self._text_ids(text)
        if self.add_bos if add_bos is None else add_bos:
            ids = self._with_bos(ids)
        return ids

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.bos_id is None:
            raise MinillmError("this model has no BOS token to add")
        return ids if ids[:1] == [self.bos_id] else [self.bos_id, *ids]

    @cached_property
    def _template(self) -> ChatTemplate:
        """The chat template compiled in minillm.template's bounded sandbox."""
        if self.chat_template is None:
            raise MinillmError("this model has no tokenizer.chat_template in its metadata")
        return ChatTemplate(self.chat_template)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template writes it out (as HF transformers renders
        it: sandboxed, trim_blocks, lstrip_blocks), within minillm.template's bounds."""
        def token_text(token_id):
            return "" if token_id is None else self._template_tokens[token_id]
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=token_text(self.bos_id), eos_token=token_text(self.eos_id))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation: special tokens the template wrote become their
        ids, while the same strings typed inside a message stay ordinary text.

        How: every special-token string in the messages is broken with a marker before rendering,
        so the only intact ones in the result are the template's. The text between them is
        tokenized whole, markers removed, exactly as the rendered string would be.
        """
        defused = [{k: self._defuse(v) if isinstance(v, str) else v for k, v in m.items()} for m in messages]
        rendered = self.render_chat(defused, add_generation_prompt)
        ids, start = [], 0
        for match in self._special_re.finditer(rendered):
            ids += self.encode(_restore(rendered[start:match.start()]), add_bos=False)
            ids.append(self._special_ids[match[0]])
            start = match.end()
        ids += self.encode(_restore(rendered[start:]), add_bos=False)
        return self._with_bos(ids) if self.add_bos else ids

    def _defuse(self, text: str) -> str:
        """Double existing markers, then put a marker after the first character of each
        special-token string: "<|im_end|>" -> "<\\ufdd0|im_end|>". `_restore` undoes both."""
        text = text.replace(_MARK, _MARK * 2)
        return self._special_re.sub(lambda m: m[0][0] + _MARK + m[0][1:], text)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (a piece of UTF-8, not always a whole character)."""
        self._check_id(token_id)
        return self._token_blob[self._token_offsets[token_id]:self._token_offsets[token_id + 1]]

    def decode(self, ids) -> str:
        """Text of a token sequence; bytes that are not valid UTF-8 become U+FFFD (each maximal
        invalid piece one U+FFFD, as Rust's from_utf8_lossy in `tokenizers` does)."""
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def _check_id(self, token_id: int):
        if not 0 <= token_id < self.vocab_size:
            raise MinillmError(f"token id {token_id} is outside the vocabulary of {self.vocab_size}")

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


class ByteLevelBPE(Tokenizer):
    """Byte-level BPE (`tokenizer.ggml.model = "gpt2"`, SmolLM2): the steps in the module docstring."""

    def __init__(self, byte_char_ids: dict[str, int], merges: MergeTable, pre: str, **common):
        """`byte_char_ids`: the token of each byte character ("Ġ" -> 220), without the bytes the
        vocabulary has no token for; `merges` the ranked rules; `pre` the tokenizer.ggml.pre value."""
        super().__init__(token_bytes=_token_bytes_table(common["tokens"]), **common)
        self._pre_tokenizer = _pre_tokenizer(pre)
        self._merges = merges
        self._byte_char_ids = byte_char_ids

    @classmethod
    def from_metadata(cls, metadata: dict, path="model") -> "ByteLevelBPE":
        common, index = cls.common_settings(metadata, path)
        merges = MergeTable.from_strings(typed.require(metadata, "tokenizer.ggml.merges", path), index)
        byte_char_ids = {ch: i for ch in bytes_to_unicode().values() if (i := index.find(ch)) is not None}
        return cls(byte_char_ids, merges, typed.require(metadata, "tokenizer.ggml.pre", path), **common)

    def _text_ids(self, text: str) -> list[int]:
        """A byte with no token of its own is dropped. SmolLM2 lacks six ASCII controls (0x04 0x06
        0x13 0x14 0x16 0x1D) and the UTF-8 lead bytes F1 and F2, which only the unassigned planes
        4-11 use: such text does not survive a round trip. minillm (like `tokenizers`) drops the
        byte before merging; llama.cpp drops it after, so inside a word the ids can differ
        ("!\x16!" is "!!" here, "!", "!" in llama.cpp)."""
        ids = []
        for piece in text_pieces(text):
            # pre_tokenize_str gives (word in byte characters, (start, end) in the piece) pairs
            for word, _ in self._pre_tokenizer.pre_tokenize_str(piece):
                ids += self._word_ids(word)
        return ids

    def _merge_word(self, word: str) -> tuple[int, ...]:
        """BPE on one word of byte characters: start from one token per character, then join
        the adjacent pair whose rule ranks first (the leftmost among equals) until no rule applies.

        The candidate joins wait in a heap ordered by (rank, position), so each join costs
        O(log n): the ranks of all first pairs are found at once, and a join looks up only the two
        pairs it makes with its neighbours. A heap entry remembers the two tokens it would join and
        is skipped once either has changed. (Finding the best pair by scanning the whole word for
        every join cost O(n) each: a word of 30,000 repeated characters took a minute.)"""
        ids = [self._byte_char_ids[ch] for ch in word if ch in self._byte_char_ids]  # n tokens, joined in place
        n = len(ids)
        if n < 2:
            return tuple(ids)
        pairs = np.array(ids, np.int64)
        ranks, merged = self._merges.find(pairs[:-1], pairs[1:])  # (n - 1,) for the pairs (ids[i], ids[i + 1])
        heap = [(r, i, ids[i], ids[i + 1], m) for i, (r, m) in enumerate(zip(ranks.tolist(), merged.tolist()))
                if r != NO_RULE]
        heapq.heapify(heap)
        after = list(range(1, n + 1))   # the token after position i (n: none); joined positions drop out
        before = list(range(-1, n - 1))
        rules = {}  # (left, right) -> (rank, token): a long word meets the same pairs again and again

        def push(i, left, right):
            if (left, right) not in rules:
                r, m = self._merges.find(np.array([left]), np.array([right]))
                rules[left, right] = int(r[0]), int(m[0])
            rank, token = rules[left, right]
            if rank != NO_RULE:
                heapq.heappush(heap, (rank, i, left, right, token))
        while heap:
            _, i, left, right, token = heapq.heappop(heap)
            j = after[i]
            if j == n or ids[i] != left or ids[j] != right:  # i was joined into its left neighbour, or j changed
                continue
            ids[i], ids[j] = token, -1
            after[i] = after[j]
            if after[i] < n:
                before[after[i]] = i
                push(i, token, ids[after[i]])
            if before[i] >= 0:
                push(before[i], ids[before[i]], token)
        return tuple(t for t in ids if t >= 0)


def _restore(text: str) -> str:
    """Undo `Tokenizer._defuse`: a doubled marker becomes one, a single marker disappears."""
    return _MARK_OR_ESCAPED_MARK.sub(r"\1", text)


class StreamDecoder:
    """Decodes ids one at a time for printing while generating. `push` returns only whole
    characters; the bytes of a character split across tokens wait for the next push."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        # errors="replace" still holds back an incomplete sequence at the end of the input;
        # it replaces only bytes that can never become valid, as `decode` does.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this token (possibly empty)."""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held back at the end: U+FFFD for each unfinished character, else ''."""
        return self._utf8.decode(b"", final=True)
