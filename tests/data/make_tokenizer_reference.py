"""Regenerate tests/data/tokenizer_reference*.json: llama.cpp's token ids for the tokenizer corpus.

The ids come from llama.cpp (through llama-cpp-python), an implementation independent of
minillm and of HF `tokenizers`:
  - each corpus string: `tokenize(text.encode(), add_bos=False, special=False)`, so special-token
    strings typed in the text stay plain text, as in `minillm.tokenizer.Tokenizer.encode`;
  - one conversation, rendered by llama-cpp-python's Jinja2ChatFormatter with the model's chat
    template, or, for a file without one (Gemma 3), by llama.cpp's built-in "gemma" format
    (`llama_chat_apply_template`), then `tokenize(rendered.encode(), add_bos=True, special=True)`
    (a BOS only where the vocabulary adds one), the ids that `Tokenizer.encode_chat` must give (its
    messages contain no special-token strings).

Usage:  pip install llama-cpp-python   (builds llama.cpp from source: 15-20 minutes)
        python tests/data/make_tokenizer_reference.py [MODEL.gguf] [--out NAME.json]
    SmolLM2 (the default) -> tokenizer_reference.json; Gemma 3 270M ->
    --out tokenizer_reference_gemma3.json; tests/data/tiny_gemma3.gguf -> --out tokenizer_reference_tiny_gemma3.json
"""

import argparse
import ctypes
import hashlib
import json
import re
import sys
from pathlib import Path

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

HERE = Path(__file__).parent
DEFAULT_MODEL = HERE.parent.parent / "weights" / "SmolLM2-135M-Instruct.Q4_1.gguf"

CHAT_MESSAGES = [
    {"role": "user", "content": "Write a Python function that adds 1,000 to x."},
    {"role": "assistant", "content": "def add(x):\n    return x + 1000\n"},
    {"role": "user", "content": "Merci ! Et en 日本語? 🙂"},
]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def chat_reference(llm: llama_cpp.Llama) -> dict:
    metadata = llm.metadata
    if "tokenizer.chat_template" in metadata:
        messages = CHAT_MESSAGES
        tokens_text = {name: llm.detokenize([int(metadata[f"tokenizer.ggml.{name}_token_id"])], special=True).decode()
                       if f"tokenizer.ggml.{name}_token_id" in metadata else "" for name in ("bos", "eos")}
        formatter = Jinja2ChatFormatter(metadata["tokenizer.chat_template"], eos_token=tokens_text["eos"],
                                        bos_token=tokens_text["bos"], add_generation_prompt=True)
        rendered = formatter(messages=messages).prompt
    else:  # a system message too: the built-in format folds it into the first user turn
        messages = [{"role": "system", "content": "  Answer briefly.\n"}, *CHAT_MESSAGES]
        rendered = builtin_template(b"gemma", messages)
    return {
        "messages": messages,
        "add_generation_prompt": True,
        "rendered": rendered,
        "ids": llm.tokenize(rendered.encode("utf-8"), add_bos=True, special=True),
    }


def builtin_template(name: bytes, messages: list[dict]) -> str:
    """The conversation in one of llama.cpp's built-in chat formats (llama-chat.cpp), with the prompt
    for the assistant's turn."""
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(name, chat, len(messages), True, buf, len(buf))
    assert 0 < n <= len(buf)
    return buf.raw[:n].decode("utf-8")


def escape_invisible(ch: str) -> str:
    """A character as JSON should show it to a reader: itself, or \\uXXXX escapes (UTF-16,
    as JSON requires) for controls, format and unassigned characters."""
    if ch.isprintable() or ch == "\n":
        return ch
    units = ch.encode("utf-16-be")
    return "".join(f"\\u{int.from_bytes(units[i:i + 2], 'big'):04x}" for i in range(0, len(units), 2))


def to_json(reference: dict) -> str:
    """Indented JSON with each list of ids on one line and invisible characters escaped. Only
    lists that the indenting broke over lines are joined: no JSON string holds a raw newline."""
    text = json.dumps(reference, ensure_ascii=False, indent=1)
    text = re.sub(r"\[\n[\d,\s]+\]", lambda m: json.dumps(json.loads(m[0])), text)
    text = "".join(map(escape_invisible, text)) + "\n"
    assert json.loads(text) == reference
    return text


def main(model_path: Path, out_name: str):
    corpus = json.loads((HERE / "tokenizer_corpus.json").read_text(encoding="utf-8"))
    llm = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    reference = {
        "produced_by": f"llama.cpp through llama-cpp-python {llama_cpp.__version__}: "
                       "Llama(vocab_only=True).tokenize(text.encode(), add_bos=False, special=False); "
                       "chat: Jinja2ChatFormatter or llama_chat_apply_template, then tokenize(special=True)",
        "model": model_path.name,
        "model_sha256": sha256(model_path),
        "texts": [{"text": text, "ids": llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)}
                  for text in corpus],
        "chat": chat_reference(llm),
    }
    out = HERE / out_name
    out.write_text(to_json(reference), encoding="utf-8")
    print(f"wrote {out}: {len(corpus)} texts")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--out", default="tokenizer_reference.json", help="file name in tests/data")
    args = parser.parse_args()
    main(args.model, args.out)
