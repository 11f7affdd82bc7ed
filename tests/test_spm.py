"""The SentencePiece tokenizer (minillm.spm, Gemma 3's vocabulary) against llama.cpp's token ids, its
segmenting against merging whole fragments, round trips, Gemma's built-in chat format, bad metadata,
and the memory it holds.

tests/data/tokenizer_reference_gemma3.json and tokenizer_reference_tiny_gemma3.json hold llama.cpp's
ids for tests/data/tokenizer_corpus.json with Gemma 3 270M's vocabulary (262,144 pieces) and with the
400-piece SentencePiece model of tests/data/tiny_gemma3.gguf (trained by make_gemma3_reference.py with
Gemma's settings); tests/data/make_tokenizer_reference.py regenerates them.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minillm.errors import MinillmError
from minillm.gguf import GGUFFile
from minillm.memory import MiB
from minillm.spm import SPACE, SentencePiece
from minillm.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"
CORPUS = json.loads((DATA / "tokenizer_corpus.json").read_text(encoding="utf-8"))
BOOK = (DATA / "alice_in_wonderland.txt").read_text(encoding="utf-8")
TINY = DATA / "tiny_gemma3.gguf"
START, END = "<start_of_turn>", "<end_of_turn>"

# Any text without "▁" (SentencePiece writes a space that way, so a "▁" typed in the text reads back
# as a space, in llama.cpp and SentencePiece too), with user-defined pieces and Gemma's one piece
# that joins two words ("> </").
any_text = st.lists(st.one_of(st.text(st.characters(exclude_categories=["Cs"], exclude_characters=SPACE)),
                              st.sampled_from(["\n\n", "  ", "   ", "<table>", " the", "> </", "🙂", "日本語"])),
                    max_size=12).map("".join)


def reference(name: str) -> dict:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tiny_metadata():
    return GGUFFile(TINY).metadata


@pytest.fixture(scope="module")
def tiny(tiny_metadata):
    return Tokenizer.from_metadata(tiny_metadata)


@pytest.fixture(scope="module")
def gemma(gemma3_path):
    return Tokenizer.from_metadata(GGUFFile(gemma3_path).metadata)


def check_against_llama_cpp(tok, golden: dict):
    assert [t["text"] for t in golden["texts"]] == CORPUS
    for case in golden["texts"]:
        assert tok.encode(case["text"], add_bos=False) == case["ids"], repr(case["text"])
    chat = golden["chat"]
    assert tok.render_chat(chat["messages"], chat["add_generation_prompt"]) == chat["rendered"]
    assert tok.encode_chat(chat["messages"], chat["add_generation_prompt"]) == chat["ids"]


def test_tiny_vocabulary_matches_llama_cpp(tiny):
    """Every corpus string, and a conversation in Gemma's built-in turn format."""
    assert isinstance(tiny, SentencePiece)
    check_against_llama_cpp(tiny, reference("tokenizer_reference_tiny_gemma3.json"))


@pytest.mark.weights
def test_gemma3_vocabulary_matches_llama_cpp(gemma):
    check_against_llama_cpp(gemma, reference("tokenizer_reference_gemma3.json"))


@pytest.mark.weights
def test_gemma3_special_tokens_and_settings(gemma):
    assert (gemma.vocab_size, gemma.bos_id, gemma.eos_id, gemma.add_bos) == (262144, 2, 1, True)
    assert gemma.stop_ids == {1, 106}                      # <eos>, and <end_of_turn> found by its text
    assert gemma.encode("Hi")[0] == 2 and gemma.encode("Hi", add_bos=False)[0] != 2
    assert gemma.encode("\n\n\n", add_bos=False) == [109]   # a user-defined piece, cut out whole
    assert gemma.encode(START, add_bos=False) != [105]      # control tokens in plain text are text
    assert gemma.decode(gemma.encode("Hello  world\n\n<table> ünï 🙂 \x00")) == "Hello  world\n\n<table> ünï 🙂 \x00"


@pytest.mark.weights
def test_gemma3_tokenizer_holds_about_11_mib(gemma3_path):
    """Gemma's vocabulary is 5x SmolLM2's. Built from the file's metadata (the token strings in one
    bytes object, scores and types as the parser's Python lists), the tokenizer adds its NumPy tables:
    TokenIndex (4 MiB), scores (1 MiB), the decoded pieces and their offsets (3.5 MiB), the byte
    tokens and the cut pattern. Measured in a process of its own, from the baseline a capped run has."""
    script = """
import gc, sys
from minillm.gguf import GGUFFile
from minillm.runtime import RunConfig, warm_up_kernels
from minillm.tokenizer import Tokenizer
meter = warm_up_kernels(RunConfig(mem_cap=1 << 30))
gguf = GGUFFile(sys.argv[1])
gc.collect()
metadata = meter.measure()
tokenizer = Tokenizer.from_metadata(gguf.metadata)
gc.collect()
held = meter.measure()
print(metadata.anon + metadata.file, held.anon + held.file, held.peak)
"""
    run = subprocess.run([sys.executable, "-c", script, str(gemma3_path)], capture_output=True, text=True, check=True)
    metadata, held, peak = map(int, run.stdout.split()[-3:])
    assert held - metadata <= 13 * MiB and held <= 30 * MiB and peak <= 36 * MiB, \
        (metadata / MiB, held / MiB, peak / MiB)


def test_segments_merge_as_the_whole_fragment(tiny):
    """The module docstring's claim, on the book: cutting a fragment before each "▁" no piece joins
    across gives the same ids as merging the fragment whole, as llama.cpp does."""
    text = BOOK[:6000].replace(" ", SPACE)
    pieces = tiny._cut.split(text)
    assert len(pieces) > 500
    assert [i for piece in pieces for i in tiny._merge_word(piece)] == list(tiny._merge_word(text))


@given(text=any_text)
def test_decode_inverts_encode(tiny, text):
    """Byte fallback covers every character the 400 pieces lack, so any text survives."""
    assert tiny.decode(tiny.encode(text)) == text


def test_book_round_trip_and_bos(tiny):
    ids = tiny.encode(BOOK[:20000])
    assert ids[0] == tiny.bos_id and tiny.decode(ids) == BOOK[:20000]  # <bos> decodes to nothing
    assert tiny.decode(tiny.encode(f"a{SPACE}b")) == "a b"


def test_gemma_turns_fold_the_system_message(tiny, tiny_metadata):
    """llama.cpp's built-in "gemma" format: system text trimmed and put at the top of the next user
    turn, "assistant" written "model", every content trimmed of C's whitespace only."""
    messages = [{"role": "system", "content": " Be brief.\n"}, {"role": "user", "content": "\tHi\u00a0"},
                {"role": "assistant", "content": "Hello"}]
    assert tiny.render_chat(messages) == (f"{START}user\nBe brief.\n\nHi\u00a0{END}\n{START}model\nHello{END}\n"
                                          f"{START}model\n")
    assert tiny.render_chat(messages[1:2], add_generation_prompt=False) == f"{START}user\nHi\u00a0{END}\n"
    end_of_turn = list(tiny_metadata["tokenizer.ggml.tokens"]).index(END)
    assert tiny.stop_ids == {tiny.eos_id, end_of_turn}  # found by its text, as llama.cpp finds it


def test_add_space_prefix_follows_llama_cpp(tiny_metadata):
    """SentencePiece's default (Llama 2's files): a space before the text and after each user-defined
    piece; Gemma's files turn it off."""
    plain = Tokenizer.from_metadata(tiny_metadata)
    prefixed = Tokenizer.from_metadata({**tiny_metadata, "tokenizer.ggml.add_space_prefix": True})
    assert prefixed.encode("the", add_bos=False) == plain.encode(" the", add_bos=False)
    assert prefixed.encode("a<start_of_turn>b", add_bos=False) == plain.encode(" a<start_of_turn>b", add_bos=False)


@pytest.mark.parametrize("key, value, message", [
    ("tokenizer.ggml.model", "bert", "unsupported tokenizer.ggml.model 'bert'.*'gpt2'.*'llama'"),
    ("tokenizer.ggml.scores", [0.0], "scores has 1 entries for 400 tokens"),
])
def test_bad_metadata_is_a_minillm_error(tiny_metadata, key, value, message):
    with pytest.raises(MinillmError, match=message):
        Tokenizer.from_metadata({**tiny_metadata, key: value})


def test_a_missing_byte_token_is_a_minillm_error(tiny_metadata):
    tokens = list(tiny_metadata["tokenizer.ggml.tokens"])
    tokens[tokens.index("<0x41>")] = "<no-A>"
    with pytest.raises(MinillmError, match="no byte token <0x41>"):
        Tokenizer.from_metadata({**tiny_metadata, "tokenizer.ggml.tokens": tokens})
