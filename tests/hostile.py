"""Hostile GGUF files, written on purpose: a raw writer that can say anything, the smallest
reproducer of every defect issue 16 lists, and the structured mutations the fuzzers draw from.

gguf's GGUFWriter only writes valid files (one value per key, offsets it computes itself), so the
files here are written by `RawGGUF`, a plain serializer of the format (minillm.gguf's docstring
shows the layout) that records where each field of the header lands (`Region`), so a mutation can
aim at any one of them. Every file starts from the micro model: `write_tiny` with one layer of
width 32 and Q4_0 matrices, 14.7 KB; `generate -n 2` runs on it (in its chat template).

tests/test_fuzz.py runs a fixed sample of the mutations in the suite; `python tests/fuzz_gguf.py`
is the campaign (10,000 files by default).
"""

import collections
import contextlib
import io
import itertools
import math
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from minillm import metadata
from minillm.gguf import GGUFFile
from minillm.synthetic import write_tiny

V = GGUFValueType
SCALAR_FORMATS = {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i",
                  V.UINT64: "Q", V.INT64: "q", V.FLOAT32: "f", V.FLOAT64: "d", V.BOOL: "?"}


@dataclass
class Value:
    """A metadata value as stored: its type and, for an array, the element type. Items of an
    array of arrays are Values themselves."""
    vtype: int
    value: object
    element: int | None = None


@dataclass
class Tensor:
    name: str
    ne: list            # GGUF order: ne[0] is the row length
    ggml_type: int
    offset: int         # from the start of the data section


@dataclass(frozen=True)
class Region:
    """Where one field of the header lies in the written file: `kind` is "u32", "u64", "str" (the
    bytes of a string) or a scalar format."""
    name: str
    start: int
    size: int
    kind: str

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass
class RawGGUF:
    kv: list                      # [(key, Value)], in file order; a key may repeat
    tensors: list                 # [Tensor], in file order
    data: bytes                   # the data section
    version: int = 3
    n_kv: int | None = None       # None: the number of entries in kv
    n_tensors: int | None = None  # None: the number of entries in tensors
    alignment: int = 32
    regions: list = field(default_factory=list)

    @classmethod
    def read(cls, path) -> "RawGGUF":
        f = GGUFFile(path)
        kv = [(key, Value(vtype, value, element)) for key, value in f.metadata.items()
              for vtype, element in [f.value_types[key]]]
        tensors = [Tensor(t.name, list(reversed(t.shape)), int(t.ggml_type), t.offset - f.data_start)
                   for t in f.tensors.values()]
        return cls(kv, tensors, Path(path).read_bytes()[f.data_start:])

    def get(self, key):
        return next(v for k, v in self.kv if k == key)

    def with_value(self, key, value: Value) -> "RawGGUF":
        """A copy with `key` set to `value` (added at the end when absent)."""
        kv = [(k, value if k == key else v) for k, v in self.kv]
        return replace(self, kv=kv if any(k == key for k, _ in kv) else kv + [(key, value)])

    def without_key(self, key) -> "RawGGUF":
        return replace(self, kv=[(k, v) for k, v in self.kv if k != key])

    def tensor_bytes(self, t: Tensor) -> bytes:
        return self.data[t.offset:t.offset + tensor_nbytes(t)]

    def with_tensors(self, tensors: list) -> "RawGGUF":
        """A copy holding `tensors` (their bytes taken from this file at their offsets), laid out
        one after the other as a valid file is, padded to the alignment."""
        data, placed = bytearray(), []
        for t in tensors:
            payload = self.tensor_bytes(t)
            placed.append(replace(t, offset=len(data)))
            data += payload + bytes(-len(payload) % self.alignment)
        return replace(self, tensors=placed, data=bytes(data))

    def to_bytes(self) -> bytes:
        """The file, with `regions` filled in."""
        w = _Writer()
        w.put("magic", "str", b"GGUF")
        w.put("version", "u32", struct.pack("<I", self.version))
        w.put("tensor count", "u64", struct.pack("<Q", len(self.tensors) if self.n_tensors is None else self.n_tensors))
        w.put("metadata count", "u64", struct.pack("<Q", len(self.kv) if self.n_kv is None else self.n_kv))
        for key, value in self.kv:
            w.string(f"key {key}", key)
            w.put(f"{key} type", "u32", struct.pack("<I", value.vtype))
            w.value(key, value.vtype, value.value, value.element)
        for t in self.tensors:
            w.string(f"tensor {t.name} name", t.name)
            w.put(f"tensor {t.name} n_dims", "u32", struct.pack("<I", len(t.ne)))
            for i, n in enumerate(t.ne):
                w.put(f"tensor {t.name} ne[{i}]", "u64", struct.pack("<Q", n))
            w.put(f"tensor {t.name} type", "u32", struct.pack("<I", t.ggml_type))
            w.put(f"tensor {t.name} offset", "u64", struct.pack("<Q", t.offset))
        w.put("padding", "str", bytes(-len(w.buf) % self.alignment))
        w.put("data", "str", self.data)
        self.regions = w.regions
        return bytes(w.buf)

    def write(self, path) -> Path:
        Path(path).write_bytes(self.to_bytes())
        return Path(path)


def tensor_nbytes(t: Tensor) -> int:
    from gguf import GGML_QUANT_SIZES
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(t.ggml_type)]
    return math.prod(t.ne) // block * type_size


class _Writer:
    def __init__(self):
        self.buf, self.regions = bytearray(), []

    def put(self, name, kind, data: bytes):
        self.regions.append(Region(name, len(self.buf), len(data), kind))
        self.buf += data

    def string(self, name, text):
        raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
        self.put(f"{name} length", "u64", struct.pack("<Q", len(raw)))
        self.put(name, "str", raw)

    def value(self, name, vtype, value, element):
        if vtype == V.STRING:
            self.string(f"{name} value", value)
        elif vtype == V.ARRAY:
            self.put(f"{name} element type", "u32", struct.pack("<I", element))
            self.put(f"{name} count", "u64", struct.pack("<Q", len(value)))
            for item in value:
                if element == V.ARRAY:
                    self.value(f"{name}[]", V.ARRAY, item.value, item.element)
                else:
                    self.value(f"{name}[]", element, item, None)
        elif vtype in SCALAR_FORMATS:
            fmt = SCALAR_FORMATS[V(vtype)]
            self.put(f"{name} value", fmt, struct.pack("<" + fmt, value))


# --- the micro model and the reproducers of issue 16 ------------------------------------------

def micro_model(path) -> Path:
    """The 14.7 KB valid model every hostile file starts from (generate -n 2 runs on it)."""
    return write_tiny(path, n_layers=1, dim=32, n_heads=1, n_kv_heads=1, ffn_dim=32, context_length=64,
                      weight_type=GGMLQuantizationType.Q4_0)


def nested(depth: int) -> Value:
    """An array of arrays `depth` deep, with one UINT8 at the bottom."""
    value = Value(V.ARRAY, [1], V.UINT8)
    for _ in range(depth - 1):
        value = Value(V.ARRAY, [value], V.ARRAY)
    return value


def with_nan_tensor(g: RawGGUF, name: str) -> RawGGUF:
    t = next(t for t in g.tensors if t.name == name)
    values = np.frombuffer(g.tensor_bytes(t), np.float32).copy()
    values[0] = np.nan
    data = g.data[:t.offset] + values.tobytes() + g.data[t.offset + values.nbytes:]
    return replace(g, data=data)


def duplicate_tensor(g: RawGGUF, name: str) -> RawGGUF:
    """`name` listed twice, the second entry with bytes of its own after the others: only the name repeats."""
    t = next(t for t in g.tensors if t.name == name)
    return g.with_tensors(g.tensors + [t])


def overlapping_tensors(g: RawGGUF, a: str, b: str) -> RawGGUF:
    """Tensor b pointed at tensor a's bytes (they have the same shape and type)."""
    ta = next(t for t in g.tensors if t.name == a)
    return replace(g, tensors=[replace(t, offset=ta.offset) if t.name == b else t for t in g.tensors])


# name -> (how the micro model is changed, extra command-line flags, words the one-line error must contain)
REPRODUCERS = {
    "nested_array_600": (lambda g: g.with_value("x.nested", nested(600)), [], ["x.nested", "nests arrays"]),
    "block_count_2^32-1": (lambda g: g.with_value("llama.block_count", Value(V.UINT32, 2**32 - 1)), [],
                           ["block_count 4294967295", "tensors"]),
    "bos_id_float": (lambda g: g.with_value("tokenizer.ggml.bos_token_id", Value(V.FLOAT32, 1.0)), [],
                     ["tokenizer.ggml.bos_token_id is a FLOAT, expected an INTEGER"]),
    "bos_id_bool": (lambda g: g.with_value("tokenizer.ggml.bos_token_id", Value(V.BOOL, True)), [],
                    ["tokenizer.ggml.bos_token_id is a BOOL"]),
    "eos_id_string": (lambda g: g.with_value("tokenizer.ggml.eos_token_id", Value(V.STRING, "2")), [],
                      ["tokenizer.ggml.eos_token_id is a STRING"]),
    "eos_id_array": (lambda g: g.with_value("tokenizer.ggml.eos_token_id", Value(V.ARRAY, [2], V.UINT32)), [],
                     ["tokenizer.ggml.eos_token_id is an ARRAY of INTEGER"]),
    "tokens_scalar": (lambda g: g.with_value("tokenizer.ggml.tokens", Value(V.UINT32, 5)), [],
                      ["tokenizer.ggml.tokens is an INTEGER, expected an ARRAY of STRING"]),
    "tokens_nested_arrays": (lambda g: g.with_value("tokenizer.ggml.tokens", Value(
        V.ARRAY, [Value(V.ARRAY, [t], V.STRING) for t in g.get("tokenizer.ggml.tokens").value], V.ARRAY)), [],
        ["tokenizer.ggml.tokens is an ARRAY of ARRAY of STRING"]),
    "token_type_scalar": (lambda g: g.with_value("tokenizer.ggml.token_type", Value(V.INT32, 1)), [],
                          ["tokenizer.ggml.token_type is an INTEGER, expected an ARRAY of INTEGER"]),
    "merges_scalar": (lambda g: g.with_value("tokenizer.ggml.merges", Value(V.UINT32, 7)), [],
                      ["tokenizer.ggml.merges is an INTEGER"]),
    "merges_u32_array": (lambda g: g.with_value("tokenizer.ggml.merges", Value(V.ARRAY, [1, 2], V.UINT32)), [],
                         ["tokenizer.ggml.merges is an ARRAY of INTEGER, expected an ARRAY of STRING"]),
    "template_not_a_string": (lambda g: g.with_value("tokenizer.chat_template", Value(V.INT32, 5)), [],
                              ["tokenizer.chat_template is an INTEGER, expected a STRING"]),
    "missing_tensor_under_mem_cap": (
        lambda g: replace(g, tensors=[replace(t, name="blk.0.ffn_down.bias") if t.name == "blk.0.ffn_down.weight"
                                      else t for t in g.tensors]),
        ["--mem-cap", "64MiB"], ["missing tensor blk.0.ffn_down.weight"]),
    "duplicate_tensor": (lambda g: duplicate_tensor(g, "output_norm.weight"), [],
                         ["tensor output_norm.weight is listed twice"]),
    "duplicate_key": (lambda g: replace(g, kv=g.kv + [("tokenizer.ggml.eos_token_id", Value(V.UINT32, 0))]), [],
                      ["metadata key tokenizer.ggml.eos_token_id appears twice"]),
    "overlapping_tensors": (lambda g: overlapping_tensors(g, "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"), [],
                            ["tensor blk.0.ffn_norm.weight has offset", "expected"]),
    "nan_output_norm": (lambda g: with_nan_tensor(g, "output_norm.weight"), [], ["non-finite"]),
}

# Chat templates that escaped the sandbox before (the list), and others of their kind.
HOSTILE_TEMPLATES = {
    "range over the sandbox limit": "{{ range(1000000) }}",
    "division by zero": "{{ 1/0 }}",
    "break outside a loop": "{% break %}",
    "wordwrap(0)": "{{ 'a b c'|wordwrap(0) }}",
    "truncate(-5)": "{{ 'abc'|truncate(-5) }}",
    "huge integer power": "{{ 9**999999 }}",
    "str + int": "{{ 'a' + 1 }}",
    "macro recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "deep parentheses": "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
    "string times 3e8": "{{ 'x' * 300000000 }}",
    "center(1e9)": "{{ 'x'|center(1000000000) }}",
    "indent(1e9)": "{{ 'x\ny'|indent(1000000000) }}",
    "namespace doubling": "{% set ns = namespace(s='ab') %}{% for i in range(34) %}{% set ns.s = ns.s ~ ns.s %}"
                          "{% endfor %}{{ ns.s }}",
    "nested loops of 1e10": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "lipsum(1e5)": "{{ lipsum(100000) }}",
    "printf width 1e9": "{{ '%0999999999d' % 1 }}",
    "format width 1e9": "{{ '{:>999999999}'.format(1) }}",
    "str.center(1e9)": "{{ 'x'.center(10**9) }}",
    "replace blow-up": "{{ ('x' * 1000).replace('', 'y' * 10000) }}",
    "join blow-up": "{{ (range(100000)|list)|join('x' * 1000) }}",
    "batch(1e9)": "{{ [1]|batch(10**9, 0)|list }}",
    "list doubling": "{% set ns = namespace(x=[]) %}{% for i in range(40) %}{% set ns.x = [ns.x, ns.x] %}{% endfor %}"
                     "{{ ns.x }}",
    "integer squaring": "{% set ns = namespace(n=3) %}{% for i in range(100) %}{% set ns.n = ns.n * ns.n %}"
                        "{% endfor %}{{ ns.n }}",
    "sum of lists": "{{ ([[1]] * 100000)|sum(start=[]) }}",
    "lazy map of big strings": "{% for x in range(100000)|map('center', 100000) %}{% endfor %}",
    "captured output": "{% set x %}{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}{% endset %}{{ x|length }}",
    "int.to_bytes(1e9)": "{{ (2).to_bytes(10**9, 'little') }}",
    "undefined filter": "{{ 'x'|nosuchfilter }}",
    "syntax error": "{% for %}",
}


def hostile_template(g: RawGGUF, source: str) -> RawGGUF:
    return g.with_value("tokenizer.chat_template", Value(V.STRING, source))


# --- running a file as the command line does ------------------------------------------------------

def run_cli(argv: list) -> tuple[int, str]:
    """minillm's command line in this process: (exit code, stderr). An exception other than the
    one-line errors main() prints escapes from here, as it would as a traceback."""
    from minillm.cli import main
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def command(path, n: int, chat: bool = False) -> list:
    """The n-th of the commands the fuzzers run a file through (they take turns); with `chat`, one
    that renders the chat template (generate does unless --raw)."""
    generate = ["generate", "-m", path, "hi", "-n", "2", "--temp", "0", "-t", "1"]
    turns = [["info", "-m", path], generate, generate + ["--bits", "8"], generate + ["--raw", "--bits", "32"],
             generate + ["--backend", "numpy"], generate + ["--mode", "ggml"]]
    turn = turns[n % len(turns)]
    return turn if not chat or "--raw" not in turn else generate


# --- structured mutations -------------------------------------------------------------------------

READ_KEYS = [key.replace("{arch}", "llama") for key in metadata.KEYS]
# A value of every GGUF type, with edge values of each.
SAMPLE_VALUES = [
    Value(V.UINT8, 0), Value(V.UINT8, 255), Value(V.INT8, -1), Value(V.UINT16, 65535), Value(V.INT16, -32768),
    Value(V.UINT32, 0), Value(V.UINT32, 1), Value(V.UINT32, 2**32 - 1), Value(V.INT32, -1), Value(V.INT32, 2**31 - 1),
    Value(V.UINT64, 2**64 - 1), Value(V.UINT64, 2**40), Value(V.INT64, -(2**63)), Value(V.FLOAT32, float("nan")),
    Value(V.FLOAT32, float("inf")), Value(V.FLOAT32, 0.0), Value(V.FLOAT32, 1e-5), Value(V.FLOAT64, -1.0),
    Value(V.BOOL, True), Value(V.BOOL, False), Value(V.STRING, ""), Value(V.STRING, "llama"), Value(V.STRING, "gpt2"),
    Value(V.STRING, "{{ messages }}"), Value(V.ARRAY, [], V.UINT32), Value(V.ARRAY, [1, 2, 3], V.INT32),
    Value(V.ARRAY, [0.5], V.FLOAT32), Value(V.ARRAY, ["a", "b"], V.STRING), Value(V.ARRAY, [True], V.BOOL),
    Value(V.ARRAY, [Value(V.ARRAY, [1], V.UINT8)], V.ARRAY), nested(3),
]
U64_EDGES = [0, 1, 2**32, 2**63, 2**64 - 1]  # with the field's own value +-1 and doubled, and the file size
U32_EDGES = [0, 1, 2**31, 2**32 - 1]


def metadata_mutations(g: RawGGUF):
    """Every key minillm reads given a value of every type, removed, and repeated."""
    for key in READ_KEYS:
        for value in SAMPLE_VALUES:
            yield f"{key} = {V(value.vtype).name} {value.value!r:.40}", g.with_value(key, value)
        yield f"without {key}", g.without_key(key)
        if any(k == key for k, _ in g.kv):
            yield f"{key} twice", replace(g, kv=g.kv + [(key, g.get(key))])


def tensor_mutations(g: RawGGUF):
    """Every field of every tensor entry, and the tensors' data: names, dimensions, types, offsets,
    NaN in norms and NaN or infinite block scales."""
    names = [t.name for t in g.tensors]
    for i, t in enumerate(g.tensors):
        def changed(**fields):
            return replace(g, tensors=[replace(u, **fields) if j == i else u for j, u in enumerate(g.tensors)])
        for name in ("", "x", names[(i + 1) % len(names)], t.name + ".extra"):
            yield f"{t.name} renamed {name!r}", changed(name=name)
        for ne in ([], [32], [1] + t.ne, t.ne + [1, 1, 1, 1], [n * 2 for n in t.ne], [0] + t.ne[1:],
                   [2**63] + t.ne[1:], t.ne[::-1]):
            yield f"{t.name} ne {ne}", changed(ne=ne)
        for ggml_type in (*(int(q) for q in GGMLQuantizationType), 99, 2**31):
            yield f"{t.name} type {ggml_type}", changed(ggml_type=ggml_type)
        for offset in (0, t.offset + 32, abs(t.offset - 32), t.offset + 1, 2**63, len(g.data)):
            yield f"{t.name} offset {offset}", changed(offset=offset)
        yield f"{t.name} dropped", g.with_tensors([u for u in g.tensors if u.name != t.name])
        yield f"{t.name} twice", duplicate_tensor(g, t.name)
        if t.ggml_type == GGMLQuantizationType.F32:
            yield f"{t.name} NaN", with_nan_tensor(g, t.name)
        else:  # a NaN and an infinity as the float16 scale of the first block
            for bits in (0x7E00, 0x7C00):
                data = bytearray(g.data)
                data[t.offset:t.offset + 2] = struct.pack("<H", bits)
                yield f"{t.name} scale {bits:#x}", replace(g, data=bytes(data))


def template_mutations(g: RawGGUF):
    for name, source in HOSTILE_TEMPLATES.items():
        yield f"template: {name}", hostile_template(g, source)


def region_mutations(g: RawGGUF, items_per_array: int | None = None):
    """Each field of the header overwritten in place with edge values of its kind, and the file
    cut at the start of every field: counts, lengths, types, dimensions and offsets that lie. With
    `items_per_array`, only the fields of that many items of each array (the vocabulary's 267
    strings are otherwise most of the header)."""
    raw = g.to_bytes()
    seen = collections.Counter()
    for region in g.regions:
        if items_per_array is not None:
            seen[region.name] += 1
            if seen[region.name] > items_per_array:
                continue
        if region.kind in ("u32", "u64"):
            fmt = "<I" if region.kind == "u32" else "<Q"
            original = struct.unpack_from(fmt, raw, region.start)[0]
            edges = U32_EDGES if region.kind == "u32" else U64_EDGES
            for value in sorted({*edges, original + 1, max(original - 1, 0), 2 * original, len(raw)} - {original}):
                if value < 1 << (8 * region.size):
                    yield f"{region.name} = {value}", raw[:region.start] + struct.pack(fmt, value) + raw[region.end:]
        elif region.kind == "str" and region.size and region.name != "data":
            for patch in (b"\xff", b"\x00", b"{"):
                yield f"{region.name}: first byte {patch!r}", raw[:region.start] + patch + raw[region.start + 1:]
        yield f"cut at {region.name}", raw[:region.start]


def mutations(g: RawGGUF, items_per_array: int | None = None):
    """(description, file bytes) of every structured mutation, in a fixed order (header fields of
    `items_per_array` items of each array only, when given)."""
    for description, mutated in itertools.chain(metadata_mutations(g), tensor_mutations(g), template_mutations(g)):
        yield description, mutated.to_bytes()
    yield from region_mutations(g, items_per_array)


def random_mutations(g: RawGGUF, rng: np.random.Generator):
    """Endless mutations for the campaign: a structured one (its family drawn first, so the many
    fields of the vocabulary do not crowd out the rest), and for one in four, 1 to 3 random bytes
    of its header changed on top."""
    families = [[(d, m.to_bytes()) for d, m in family(g)]
                for family in (metadata_mutations, tensor_mutations, template_mutations)]
    families.append(list(region_mutations(g)))
    header_end = len(g.to_bytes()) - len(g.data)
    while True:
        family = families[rng.integers(len(families))]
        description, raw = family[rng.integers(len(family))]
        flips = int(rng.integers(1, 4)) if rng.random() < 0.25 else 0
        raw = bytearray(raw)
        for _ in range(flips):
            at = int(rng.integers(0, max(min(header_end, len(raw)), 1)))
            if at < len(raw):
                raw[at] = int(rng.integers(0, 256))
        yield description + (f", {flips} header bytes changed" if flips else ""), bytes(raw)
