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

Decoding runs backwards: token strings -> bytes -> UTF-8. One character can span several
tokens (an emoji is 4 bytes, often 2 or 3 tokens), so `StreamDecoder` holds back the bytes of
an unfinished character instead of printing a replacement character.

The BPE itself runs in the `tokenizers` library, built from the GGUF metadata alone.
"""

import codecs
import re
from functools import cached_property

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BPETokenizer
from tokenizers import decoders, models, pre_tokenizers

from .errors import MinillmError

CONTROL = 3  # tokenizer.ggml.token_type of special tokens such as <|im_start|> (llama.cpp's LLAMA_TOKEN_TYPE_CONTROL)

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
    raise MinillmError(f"unsupported tokenizer.ggml.pre {pre!r}: minillm knows only 'smollm'")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other
    68 bytes (controls, space, ...) are moved to U+0100 onwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return table


def _token_bytes_table(tokens: list[str]) -> list[bytes]:
    """The bytes each token stands for. A token with a character outside the byte alphabet is
    taken as its own UTF-8 text, as the `tokenizers` ByteLevel decoder does."""
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    table = []
    for token in tokens:
        if all(ch in byte_of for ch in token):
            table.append(bytes(byte_of[ch] for ch in token))
        else:
            table.append(token.encode("utf-8"))
    return table


def _required(metadata: dict, key: str):
    if key not in metadata:
        raise MinillmError(f"GGUF metadata has no {key}: the file carries no usable tokenizer")
    return metadata[key]


def _parse_merges(merges: list[str]) -> list[tuple[str, str]]:
    """"Ġ t" -> ("Ġ", "t"). Byte-level tokens never contain a space, so one space separates the pair."""
    pairs = [tuple(m.split(" ")) for m in merges]
    for rank, pair in enumerate(pairs):
        if len(pair) != 2:
            raise MinillmError(f"tokenizer.ggml.merges[{rank}] = {merges[rank]!r} is not two tokens")
    return pairs


def _raise_template_error(message):
    """`raise_exception(msg)` for chat templates, as in HF transformers."""
    raise MinillmError(f"chat template: {message}")


class Tokenizer:
    """Byte-level BPE encode/decode and chat rendering for one model."""

    def __init__(self, tokens, merges, token_types, pre, bos_id, eos_id, eot_id, add_bos, chat_template):
        self.vocab_size = len(tokens)
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.chat_template = chat_template
        self._tokens = tokens
        self._bpe = BPETokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        self._bpe.pre_tokenizer = _pre_tokenizer(pre)
        self._bpe.decoder = decoders.ByteLevel()
        self._token_bytes = _token_bytes_table(tokens)
        # Control tokens are recognised only in text the chat template wrote (see encode_chat).
        self._special_ids = {tokens[i]: i for i, t in enumerate(token_types) if t == CONTROL and tokens[i]}
        by_length = sorted(self._special_ids, key=len, reverse=True)  # longest first: "<a_b>" before "<a>"
        # "(?!)" never matches: the pattern for a vocabulary without control tokens.
        self._special_re = re.compile("|".join(map(re.escape, by_length)) or "(?!)")
        named_stops = (self._special_ids.get(name) for name in ("<|im_end|>", "<|endoftext|>"))
        self.stop_ids = frozenset(i for i in (eos_id, eot_id, *named_stops) if i is not None)

    @classmethod
    def from_metadata(cls, metadata: dict) -> "Tokenizer":
        """Build the tokenizer from GGUF metadata (`minillm.gguf.GGUFFile(path).metadata`)."""
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise MinillmError(f"unsupported tokenizer.ggml.model {model!r}: "
                               "minillm reads only 'gpt2' (byte-level BPE)")
        tokens = _required(metadata, "tokenizer.ggml.tokens")
        token_types = _required(metadata, "tokenizer.ggml.token_type")
        if len(token_types) != len(tokens):
            raise MinillmError(f"tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens")
        if len(set(tokens)) != len(tokens):
            raise MinillmError("tokenizer.ggml.tokens lists the same token twice")
        ids = {key: metadata.get(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "eot")}
        for key, token_id in ids.items():
            if token_id is not None and not 0 <= token_id < len(tokens):
                raise MinillmError(f"tokenizer.ggml.{key}_token_id {token_id} "
                                   f"is outside the vocabulary of {len(tokens)}")
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
        if add_bos and ids["bos"] is None:
            raise MinillmError("tokenizer.ggml.add_bos_token is set but there is no tokenizer.ggml.bos_token_id")
        return cls(tokens, _parse_merges(_required(metadata, "tokenizer.ggml.merges")), token_types,
                   _required(metadata, "tokenizer.ggml.pre"), ids["bos"], ids["eos"], ids["eot"], add_bos,
                   metadata.get("tokenizer.chat_template"))

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of plain text. Special-token strings in it ("<|im_start|>") are ordinary text.

        A byte with no token of its own is dropped. SmolLM2 lacks six ASCII controls (0x04 0x06
        0x13 0x14 0x16 0x1D) and the UTF-8 lead bytes F1 and F2, which only the unassigned planes
        4-11 use: such text does not survive a round trip. `tokenizers` (and so minillm) drops the
        byte before merging; llama.cpp drops it after, so inside a word the ids can differ
        ("!\x16!" is "!!" here, "!", "!" in llama.cpp).
        """
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise MinillmError(f"text is not valid Unicode: {e.reason} at character {e.start}") from None
        ids = self._bpe.encode(text, add_special_tokens=False).ids
        if self.add_bos if add_bos is None else add_bos:
            ids = self._with_bos(ids)
        return ids

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.bos_id is None:
            raise MinillmError("this model has no BOS token to add")
        return ids if ids[:1] == [self.bos_id] else [self.bos_id, *ids]

    @cached_property
    def _template(self):
        """The chat template compiled as HF transformers does: sandboxed, trim_blocks, lstrip_blocks."""
        if self.chat_template is None:
            raise MinillmError("this model has no tokenizer.chat_template in its metadata")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_template_error
        try:
            return env.from_string(self.chat_template)
        except TemplateError as e:
            raise MinillmError(f"the model's chat template does not parse: {e}") from None

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template writes it out."""
        def token_text(token_id):
            return "" if token_id is None else self._tokens[token_id]
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=token_text(self.bos_id), eos_token=token_text(self.eos_id))
        except TemplateError as e:
            raise MinillmError(f"chat template failed: {e}") from None

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
        return self._token_bytes[token_id]

    def decode(self, ids) -> str:
        """Text of a token sequence; bytes that are not valid UTF-8 become U+FFFD."""
        ids = [int(i) for i in ids]
        for token_id in ids:
            self._check_id(token_id)
        return self._bpe.decode(ids)

    def _check_id(self, token_id: int):
        if not 0 <= token_id < self.vocab_size:
            raise MinillmError(f"token id {token_id} is outside the vocabulary of {self.vocab_size}")

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


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
