"""Text <-> token ids for a SentencePiece vocabulary in a GGUF file (`tokenizer.ggml.model = "llama"`:
Gemma 3, Llama 2), as llama.cpp's SPM tokenizer computes them (src/llama-vocab.cpp).

The vocabulary is a list of pieces with scores (Gemma 3: 262,144 of them, score = -rank), where a
space is written "▁" (U+2581). Encoding plain text:

1. User-defined pieces ("\\n\\n", runs of spaces, "<table>": token type 4) are cut out first, wherever
   they occur, longest first; they become their own ids. Control tokens ("<bos>", "<start_of_turn>")
   are not: in plain text they are text (the chat template's come in through `encode_chat`).
2. Each remaining fragment gets a leading space when `tokenizer.ggml.add_space_prefix` says so (at
   the start and after a user-defined piece; Gemma: no), and every space becomes "▁".
3. Merge: start from one symbol per character; repeatedly join the adjacent pair whose joined text
   is a piece with the highest score (the leftmost among equals), until no adjacent pair is a piece.
4. Each final symbol is its piece's id, or, if the text is no piece (a character the vocabulary
   lacks), one byte-fallback token "<0xXX>" per UTF-8 byte.

Decoding: "▁" back to a space, a byte token to its byte, control tokens to nothing. A file without a
chat template whose vocabulary has Gemma's turn markers gets Gemma's turn format (GEMMA_TURNS), the
one llama.cpp has built in.

Step 3 compares scores over the whole fragment, but a merge can only join text that some piece
contains. So the fragment is cut into segments, and each segment merged once and remembered as a
BPE word is: before every "▁" that follows a character c no piece has right before a "▁" (Gemma has
one such piece, ">▁</", so "> </" stays in one segment). No piece can span such a cut, so the merges
in one segment never depend on another, and the result is the same as merging the fragment whole.

The vocabulary is held in NumPy (minillm.tokenizer.TokenIndex for text -> id, the scores as float32,
the decoded bytes in one blob): about 11 MiB for Gemma 3, held beside the GGUF metadata.
"""

import heapq
import re

import numpy as np

from . import metadata as typed
from .errors import MinillmError
from .gguf import join_with_offsets
from .tokenizer import CONTROL, Tokenizer

UNKNOWN, USER_DEFINED, BYTE = 2, 4, 6  # tokenizer.ggml.token_type (llama.cpp's LLAMA_TOKEN_TYPE_*)
SPACE = "\u2581"  # "▁", SentencePiece's written space
# Gemma's turns, for a file without a chat template, as llama.cpp's built-in "gemma" format writes them
# (llama-chat.cpp, LLM_CHAT_TEMPLATE_GEMMA): system text joins the next user turn, "assistant" is
# "model", every content is trimmed of C's isspace characters.
GEMMA_TURNS = (
    r"{%- set ns = namespace(system='') -%}"
    r"{%- for m in messages -%}"
    r"{%- if m['role'] == 'system' -%}{%- set ns.system = ns.system + m['content'].strip(' \t\n\v\f\r') -%}"
    r"{%- else -%}{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    r"{{- '<start_of_turn>' + role + '\n' -}}"
    r"{%- if ns.system and role != 'model' -%}{{- ns.system + '\n\n' -}}{%- set ns.system = '' -%}{%- endif -%}"
    r"{{- m['content'].strip(' \t\n\v\f\r') + '<end_of_turn>\n' -}}"
    r"{%- endif -%}{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}")


def piece_bytes(tokens, token_types) -> tuple[bytes, np.ndarray]:
    """What each token decodes to, as llama.cpp's token_to_piece without special tokens: normal
    pieces with "▁" as a space, user-defined ones as written, a byte token "<0xXX>" as that byte,
    control and unknown tokens as nothing."""
    def decoded(text: str, kind: int) -> bytes:
        if kind == BYTE:
            return bytes([int(text[3:5], 16)])
        if kind == USER_DEFINED:
            return text.encode("utf-8")
        if kind in (CONTROL, UNKNOWN):
            return b""
        return text.replace(SPACE, " ").encode("utf-8")
    return join_with_offsets(map(decoded, tokens, token_types), len(tokens))


def joining_characters(tokens) -> str:
    """The characters some piece has right before a "▁" (other than "▁"): the only places a merge can
    cross into the next word."""
    found = set()
    for token in tokens:
        at = token.find(SPACE, 1)
        while at > 0:
            if token[at - 1] != SPACE:
                found.add(token[at - 1])
            at = token.find(SPACE, at + 1)
    return "".join(sorted(found))


class SentencePiece(Tokenizer):
    """A SentencePiece vocabulary, merged by piece scores as llama.cpp's SPM tokenizer does."""

    def __init__(self, index, scores: np.ndarray, byte_ids: np.ndarray, user_defined: list, add_space_prefix: bool,
                 **common):
        """`index`: the tokens' TokenIndex; `scores` (vocab,) float32; `byte_ids` (256,) the id of
        "<0xXX>" for each byte; `user_defined`: (text, id) of the pieces cut out first, longest first."""
        super().__init__(token_bytes=piece_bytes(common["tokens"], common["token_types"]), **common)
        self._index, self._scores, self._byte_ids = index, scores, byte_ids
        self._user_defined = user_defined
        self._add_space_prefix = add_space_prefix
        joining = joining_characters(common["tokens"])
        # a cut: just before a "▁" that follows a character other than "▁" and those that join
        self._cut = re.compile(f"(?<=[^{re.escape(SPACE + joining)}])(?={SPACE})")

    @classmethod
    def from_metadata(cls, metadata: dict, path="model") -> "SentencePiece":
        common, index = cls.common_settings(metadata, path, add_bos_default=True)  # llama.cpp's default for SPM
        tokens, types = common["tokens"], common["token_types"]
        scores = np.asarray(typed.require(metadata, "tokenizer.ggml.scores", path), np.float32)
        if scores.shape != (len(tokens),):
            raise MinillmError(f"tokenizer.ggml.scores has {scores.size} entries for {len(tokens)} tokens")
        byte_ids = np.array([index.find(f"<0x{b:02X}>") for b in range(256)], dtype=object)
        if any(i is None for i in byte_ids):
            missing = next(b for b in range(256) if byte_ids[b] is None)
            raise MinillmError(f"this SentencePiece vocabulary has no byte token <0x{missing:02X}>: minillm needs "
                               "all 256 for text outside the vocabulary")
        if common["chat_template"] is None and index.find("<start_of_turn>") is not None:
            common["chat_template"] = GEMMA_TURNS
        user_defined = sorted(((tokens[i], i) for i, t in enumerate(types) if t == USER_DEFINED and tokens[i]),
                              key=lambda piece: -len(piece[0]))  # longest first; equal lengths by id
        return cls(index, scores, byte_ids.astype(np.int64), user_defined,
                   typed.get(metadata, "tokenizer.ggml.add_space_prefix", True, path), **common)

    def _text_ids(self, text: str) -> list[int]:
        ids = []
        for fragment in self._fragments(text):
            if isinstance(fragment, int):
                ids.append(fragment)
                continue
            for segment in self._cut.split(fragment.replace(" ", SPACE)):
                ids += self._word_ids(segment)
        return ids

    def _fragments(self, text: str) -> list:
        """The text cut at user-defined pieces, longest first, as llama.cpp's tokenizer_st_partition:
        a list of ids (the pieces) and strings (the text between them, with the leading space
        add_space_prefix asks for at the start and after each piece)."""
        fragments = [text]
        for piece, token_id in self._user_defined:
            cut = []
            for fragment in fragments:
                if isinstance(fragment, int) or piece not in fragment:
                    cut.append(fragment)
                    continue
                parts = fragment.split(piece)
                for k, part in enumerate(parts):
                    if k:
                        cut.append(token_id)
                    if part:
                        cut.append(part)
            fragments = cut
        if self._add_space_prefix:
            fragments = [" " + f if isinstance(f, str) and (k == 0 or isinstance(fragments[k - 1], int)) else f
                         for k, f in enumerate(fragments)]
        return fragments

    def _merge_word(self, segment: str) -> tuple[int, ...]:
        """Steps 3 and 4 of the module docstring on one segment. The symbols are a linked list of
        character runs; a heap holds every adjacent pair whose joined text is a piece, highest score
        first, then leftmost; a pair is stale once either side has changed, and then skipped."""
        text = [*segment]                                   # text[i]: symbol i ("" once merged away)
        nxt = list(range(1, len(text))) + [-1]
        prv = list(range(-1, len(text) - 1))
        heap = []

        def push(left: int, right: int):
            if left >= 0 and right >= 0:
                token_id = self._index.find(text[left] + text[right])
                if token_id is not None:
                    heapq.heappush(heap, (-float(self._scores[token_id]), left, right, len(text[left] + text[right])))

        for i in range(len(text) - 1):
            push(i, i + 1)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if not text[left] or not text[right] or len(text[left]) + len(text[right]) != size:
                continue                                    # a side was merged since this pair was seen
            text[left], text[right] = text[left] + text[right], ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            push(prv[left], left)
            push(left, nxt[left])
        ids, i = [], 0
        while i >= 0 and text:
            token_id = self._index.find(text[i])
            ids += [token_id] if token_id is not None else self._byte_ids[list(text[i].encode("utf-8"))].tolist()
            i = nxt[i]
        return tuple(ids)
