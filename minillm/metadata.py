"""Typed reads of GGUF metadata: every key minillm reads, with the type of value it must hold.

A GGUF value carries its own type, so a broken or hostile file can give any key any type: a token
id as a string, the vocabulary as one integer, the merge rules as an array of integers. `KEYS` lists
every key minillm reads with the type it expects, and `get` is the one place that checks it: such
a file ends in one line naming the key, the type expected and the type found, never in a TypeError
deep inside the tokenizer.

minillm.gguf turns each GGUF type into one Python type, so the type can be told from the value:

| GGUF type                | Python value            | type name here     |
|--------------------------|-------------------------|--------------------|
| UINT8 ... INT64          | int                     | INTEGER            |
| FLOAT32, FLOAT64         | float                   | FLOAT              |
| BOOL                     | bool                    | BOOL               |
| STRING                   | str                     | STRING             |
| ARRAY of STRING          | StringArray (a list)    | ARRAY of STRING    |
| ARRAY of UINT8 ... INT64 | list of int             | ARRAY of INTEGER   |
| ARRAY of FLOAT32, FLOAT64| list of float           | ARRAY of FLOAT     |
| ARRAY of BOOL            | list of bool            | ARRAY of BOOL      |
| ARRAY of ARRAY           | list of lists           | ARRAY of ARRAY ... |

Integer keys accept any integer width, and float keys an integer too (SmolLM2 stores its floats as
FLOAT32; a converter that wrote 10000 as an integer would lose nothing); the same for arrays.
"""

from collections.abc import Sequence

from .errors import GGUFError

INTEGER, FLOAT, BOOL, STRING = "INTEGER", "FLOAT", "BOOL", "STRING"
STRINGS, INTEGERS, FLOATS, BOOLS = "ARRAY of STRING", "ARRAY of INTEGER", "ARRAY of FLOAT", "ARRAY of BOOL"
EMPTY_ARRAY = "an empty ARRAY"
# The type names each expected type accepts (an empty array is a valid array of anything).
ACCEPTS = {INTEGER: {INTEGER}, FLOAT: {FLOAT, INTEGER}, BOOL: {BOOL}, STRING: {STRING},
           STRINGS: {STRINGS, EMPTY_ARRAY}, INTEGERS: {INTEGERS, EMPTY_ARRAY}, FLOATS: {FLOATS, INTEGERS, EMPTY_ARRAY},
           BOOLS: {BOOLS, EMPTY_ARRAY}}

# Every key minillm reads. "{arch}" stands for the value of general.architecture. A key that may
# hold either of two types lists both (llama.cpp reads the sliding-window pattern as a period or as
# one flag per layer).
KEYS = {
    "general.architecture": STRING,
    "general.alignment": INTEGER,
    "general.name": STRING,
    "general.license": STRING,
    "general.file_type": INTEGER,
    "{arch}.block_count": INTEGER,
    "{arch}.context_length": INTEGER,
    "{arch}.embedding_length": INTEGER,
    "{arch}.feed_forward_length": INTEGER,
    "{arch}.vocab_size": INTEGER,
    "{arch}.attention.head_count": INTEGER,
    "{arch}.attention.head_count_kv": INTEGER,
    "{arch}.attention.key_length": INTEGER,
    "{arch}.attention.layer_norm_rms_epsilon": FLOAT,
    "{arch}.rope.freq_base": FLOAT,
    "{arch}.rope.dimension_count": INTEGER,
    "{arch}.rope.freq_base_swa": FLOAT,
    "{arch}.rope.scaling.type": STRING,
    "{arch}.attention.value_length": INTEGER,
    "{arch}.attention.sliding_window": INTEGER,
    "{arch}.attention.sliding_window_pattern": (INTEGER, BOOLS),
    "{arch}.final_logit_softcapping": FLOAT,
    "tokenizer.ggml.model": STRING,
    "tokenizer.ggml.pre": STRING,
    "tokenizer.ggml.tokens": STRINGS,
    "tokenizer.ggml.token_type": INTEGERS,
    "tokenizer.ggml.merges": STRINGS,
    "tokenizer.ggml.scores": FLOATS,
    "tokenizer.ggml.add_space_prefix": BOOL,
    "tokenizer.ggml.bos_token_id": INTEGER,
    "tokenizer.ggml.eos_token_id": INTEGER,
    "tokenizer.ggml.eot_token_id": INTEGER,
    "tokenizer.ggml.add_bos_token": BOOL,
    "tokenizer.chat_template": STRING,
    "general.type": STRING,
    "adapter.type": STRING,
    "adapter.lora.alpha": FLOAT,
}
_SHARED_PREFIXES = ("general.", "tokenizer.", "adapter.")


def type_name(value) -> str:
    """The GGUF type a parsed value was stored as (the table above). An array is named by its
    first element: minillm.gguf gives every element of an array the same type."""
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return INTEGER
    if isinstance(value, float):
        return FLOAT
    if isinstance(value, str):
        return STRING
    if isinstance(value, Sequence):
        return f"ARRAY of {type_name(value[0])}" if len(value) else EMPTY_ARRAY
    return type(value).__name__


def expected_type(key: str):
    """The type KEYS gives `key` (an architecture's key by its "{arch}." pattern), or a tuple of the
    types it may have."""
    pattern = key if key.startswith(_SHARED_PREFIXES) else "{arch}." + key.partition(".")[2]
    if pattern not in KEYS:
        raise KeyError(f"minillm does not read the metadata key {key}: add it to minillm.metadata.KEYS")
    return KEYS[pattern]


def get(metadata, key: str, default=None, path="model"):
    """metadata[key] once its type is the one KEYS gives it, or `default` when the key is absent.
    A value of another type is a GGUFError naming the key, both types, and the file `path`."""
    expected = expected_type(key)
    if key not in metadata:
        return default
    value = metadata[key]
    found = type_name(value)
    allowed = expected if isinstance(expected, tuple) else (expected,)
    if not any(found in ACCEPTS[name] for name in allowed):
        expected_names = " or ".join(map(article, allowed))
        raise GGUFError(path, f"metadata key {key} is {article(found)}, expected {expected_names}")
    return value


def require(metadata, key: str, path="model"):
    """As `get`, for a key the file must have."""
    value = get(metadata, key, path=path)
    if value is None:
        raise GGUFError(path, f"missing metadata key {key}")
    return value


def article(name: str) -> str:
    """ "an INTEGER", "a STRING", "an ARRAY of ...": for the messages."""
    return name if name.startswith("an ") else ("an " if name[0] in "AEIOU" else "a ") + name
