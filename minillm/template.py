"""Chat templates: the Jinja2 program a model file carries, rendered with bounded output, work and time.

A GGUF file's `tokenizer.chat_template` is code. HF transformers (and minillm) render it in jinja2's
ImmutableSandboxedEnvironment, which keeps a template away from Python's internals but not from the
machine's memory and time: `'x' * 300000000`, `'x'|center(1e9)`, a string doubled forty times in a
namespace, or two nested loops over range(100000) each exhaust one or the other. Here every render
is bounded, and a template that reaches a bound is refused with a one-line `ChatTemplateError`:

| bound         | value            | counts                                                               |
|---------------|------------------|----------------------------------------------------------------------|
| MAX_CHARS     | 1,000,000        | characters of the output, and the size of any one value it builds    |
| MAX_WORK      | 16 x MAX_CHARS   | the sizes of all values one render creates, added up (freed or not)  |
| MAX_SECONDS   | 1.0              | wall time of one render, checked in every loop and block body        |
| MAX_SOURCE    | 262,144          | characters of template source (real templates have 1 to 20 thousand) |
| MAX_INT_BITS  | 65,536           | bits of an integer that `*` or `**` may make                         |

The bound holds before memory is spent, not after: every operation that can make a value larger
than its inputs is checked with an estimate of its result *before* it runs: `*` `+` `%` `**` (the
sandbox's binop hook), `~` and list/tuple/dict literals (a code generator that routes them through
the environment), the filters that grow their input (center, indent, wordwrap, replace, join,
format, batch, slice, sum), the str methods that do (center, ljust, rjust, zfill, expandtabs,
replace, join, format; other methods outside a read-only list are refused), lipsum, and printing
(`finalize`). Sizes are measured by `size`, which counts characters of strings and elements of
containers and stops counting at the bound, so no value, however much it shares, is ever walked or
printed past it. Everything else a template computes is at most a small multiple of its inputs.
Then MAX_WORK bounds what all operations together may allocate, and the time check bounds loops
that allocate nothing. Any other error of the template (a ZeroDivisionError, a RecursionError from
a recursive macro, a Python SyntaxError from `break` outside a loop...) becomes one line as well.
"""

import inspect
import re
import threading
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager

from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import Namespace

from .errors import MinillmError, printable

MAX_CHARS = 1_000_000
MAX_WORK = 16 * MAX_CHARS
MAX_SECONDS = 1.0
MAX_SOURCE = 1 << 18
MAX_INT_BITS = 1 << 16
OPAQUE_SIZE = 64  # size counted for objects printed as a short name (macros, loop objects, undefined)


class ChatTemplateError(MinillmError):
    """A chat template that fails, or exceeds a bound, while it is compiled or rendered."""


def size(value, limit: int = MAX_CHARS) -> int:
    """About len(str(value)): characters of strings, digits of numbers, 24 for a float, and for a
    container the sizes of its items plus 2 each (within a small factor: a character inside a
    container's string may print as an escape of up to 10, '\\U000e0000'). Counting stops once past
    `limit`, so a structure that shares an item many times (a list of itself, doubled) costs at
    most `limit` steps. Iterative: no nesting depth makes it recurse."""
    total, stack = 0, [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, (str, bytes)):
            total += len(v)
        elif isinstance(v, bool) or v is None:
            total += 5
        elif isinstance(v, int):
            total += v.bit_length() * 30103 // 100000 + 2  # decimal digits and a sign
        elif isinstance(v, float):
            total += 24
        elif isinstance(v, dict):
            total += 2 + 4 * len(v)
            stack += v.keys()
            stack += v.values()
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(v)
            stack += v
        elif isinstance(v, Namespace):  # printed with all its attributes
            stack.append(object.__getattribute__(v, "_Namespace__attrs"))
        else:
            total += OPAQUE_SIZE
    return total


class Budget:
    """What one render may still spend: characters created (MAX_WORK) and time (MAX_SECONDS)."""

    def __init__(self):
        self.work = 0
        self.deadline = time.perf_counter() + MAX_SECONDS

    def tick(self):
        if time.perf_counter() > self.deadline:
            raise ChatTemplateError(f"the chat template runs longer than {MAX_SECONDS:g} s")

    def spend(self, n: int):
        self.work += n
        if self.work > MAX_WORK:
            raise ChatTemplateError(f"the chat template creates more than {MAX_WORK:,} characters in all")
        self.tick()


def refuse_over(estimate: int, what: str):
    if estimate > MAX_CHARS:
        raise ChatTemplateError(f"the chat template's {what} would make about {estimate:,} characters "
                                f"(at most {MAX_CHARS:,})")


def _number(x) -> int:
    """An argument that sets a size: its value if it is a number (inf counts as over every bound)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return MAX_CHARS + 1 if x != x or abs(x) == float("inf") else int(x)
    return 0


def _materialized(values):
    """A list of an iterable's items, its sizes added as they come (a lazy `map` may make big ones)."""
    items, total = [], 0
    for item in values:
        total += size(item)
        refuse_over(total, "join or sum")
        items.append(item)
    return items


# --- what growing operations would make, from their arguments (before they run) ----------------

_PRINTF = re.compile(r"%(?:\(([^)]*)\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)")


def printf_size(fmt, args) -> int:
    """An upper bound of len(fmt % args), read from the conversions in fmt: each takes the larger of
    its width and its value's size, plus its precision. A `*` width (taken from args) is refused."""
    if not isinstance(fmt, str):
        return size(fmt)
    positional = list(args) if isinstance(args, tuple) else [args]
    total, position = len(fmt), 0
    for key, width, precision, conversion in _PRINTF.findall(fmt):
        if "*" in (width, precision):
            raise ChatTemplateError("the chat template formats with a '*' width, which minillm does not allow")
        if conversion == "%":
            continue
        if key and isinstance(args, dict):
            value = args.get(key)
        else:
            value = positional[position] if position < len(positional) else None
            position += 1
        total += max(int(width or 0), size(value) if conversion in "sra" else size(value) + 24) + int(precision or 0)
        refuse_over(total, "% formatting")
    return total


def sequence_times(a, b) -> int:
    """Size of a * b when one side is a string or sequence and the other an integer, else 0."""
    for seq, n in ((a, b), (b, a)):
        if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
            return size(seq) * max(n, 0)
    return 0


def check_binop(op: str, a, b):
    """Refuse `a op b` before it runs when its result would pass a bound."""
    if op == "*":
        refuse_over(sequence_times(a, b), "'*'")
        if isinstance(a, int) and isinstance(b, int) and a.bit_length() + b.bit_length() > MAX_INT_BITS:
            raise ChatTemplateError(f"the chat template multiplies integers past {MAX_INT_BITS} bits")
    elif op == "**":
        if isinstance(a, int) and isinstance(b, int) and abs(a) > 1 and a.bit_length() * b > MAX_INT_BITS:
            raise ChatTemplateError(f"the chat template raises an integer to a power past {MAX_INT_BITS} bits")
    elif op == "+":
        if isinstance(a, (str, bytes, list, tuple)) and isinstance(b, (str, bytes, list, tuple)):
            refuse_over(size(a) + size(b), "'+'")
    elif op == "%":
        if isinstance(a, str):
            printf_size(a, b)


def replace_size(s, old, new, count=None) -> int:
    text, old, new = str(s), str(old), str(new)
    n = text.count(old)
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(text) + n * max(len(new) - len(old), 0)


def indent_size(s, width=4, first=False, blank=False) -> int:
    step = len(width) if isinstance(width, str) else _number(width)
    return size(s) + (str(s).count("\n") + 2) * max(step, 0)


def sum_size(iterable, attribute=None, start=0) -> int:
    if isinstance(start, (str, bytes, list, tuple)):  # summing sequences copies them over and over
        raise ChatTemplateError("the chat template sums sequences; minillm's sandbox sums numbers only")
    return 0


# Filters that can make more than their input: filter -> size of its result, from the arguments
# bound to the filter's own parameter names.
FILTER_SIZES = {
    "center": lambda value, width=80: max(size(value), _number(width)),
    "indent": indent_size,
    "wordwrap": lambda s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True:
        size(s) * (1 + size(wrapstring or "\n")),
    "replace": lambda s, old, new, count=None: replace_size(s, old, new, count),
    "join": lambda value, d="", attribute=None: size(value) + size(d) * max(len(value) - 1, 0),
    "format": lambda value, *args, **kwargs: printf_size(str(value), kwargs or args),
    "batch": lambda value, linecount, fill_with=None: _number(linecount),
    "slice": lambda value, slices, fill_with=None: _number(slices),
    "sum": sum_size,
}
MATERIALIZE = {"join": "value", "sum": "iterable"}  # the filter's iterable, listed first so it can be measured

# str (and bytes) methods a template may call: those that read, and those that make at most a
# small multiple of their input; the growing ones have a size here.
METHOD_SIZES = {
    "center": lambda s, width, fillchar=" ": max(len(s), _number(width)),
    "ljust": lambda s, width, fillchar=" ": max(len(s), _number(width)),
    "rjust": lambda s, width, fillchar=" ": max(len(s), _number(width)),
    "zfill": lambda s, width: max(len(s), _number(width)),
    "expandtabs": lambda s, tabsize=8: len(s) + s.count("\t" if isinstance(s, str) else b"\t") * max(_number(tabsize), 0),
    "replace": lambda s, old, new, count=-1: replace_size(s, old, new, count),
    "join": lambda s, items: size(items) + len(s) * max(len(items) - 1, 0),
}
READ_METHODS = {
    "capitalize", "casefold", "count", "endswith", "find", "index", "isalnum", "isalpha", "isascii",
    "isdecimal", "isdigit", "isidentifier", "islower", "isnumeric", "isprintable", "isspace", "istitle",
    "isupper", "lower", "lstrip", "partition", "removeprefix", "removesuffix", "rfind", "rindex",
    "rpartition", "rsplit", "rstrip", "split", "splitlines", "startswith", "strip", "swapcase", "title",
    "upper", "encode", "decode", "get", "items", "keys", "values", "copy", "bit_length", "is_integer",
}
VALUE_TYPES = (str, bytes, int, float, list, tuple, dict)


# --- the environment ----------------------------------------------------------------------------

class BoundedCodeGenerator(CodeGenerator):
    """jinja2's code generator, with three hooks in the Python it writes: a time check at the start
    of every block body (loops, conditions, macros), `~` through environment.join_operands, and
    list, tuple and dict literals through environment.literal (a literal [x, x] inside a loop
    could otherwise double a structure's size at every step without any checked operation)."""

    def blockvisit(self, nodes, frame):
        self.writeline("environment.tick()")
        super().blockvisit(nodes, frame)

    def visit_Concat(self, node, frame):
        self.write("environment.join_operands((")
        for operand in node.nodes:
            self.visit(operand, frame)
            self.write(", ")
        self.write("))")

    def _literal(self, visit, node, frame):
        self.write("environment.literal(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node, frame):
        self._literal(super().visit_List, node, frame)

    def visit_Dict(self, node, frame):
        self._literal(super().visit_Dict, node, frame)

    def visit_Tuple(self, node, frame):
        if node.ctx != "load":  # a loop target such as `for a, b in ...` is assigned to, not built
            return super().visit_Tuple(node, frame)
        self._literal(super().visit_Tuple, node, frame)


class BoundedFormatter(SandboxedFormatter):
    """str.format for templates: each field's width is checked before it is padded, and the
    fields of one call add up to at most MAX_CHARS."""

    def vformat(self, format_string, args, kwargs):
        self.made = len(format_string)
        return super().vformat(format_string, args, kwargs)

    def format_field(self, value, format_spec):
        widths = [int(n) for n in re.findall(r"\d+", format_spec)]
        self.made += max([size(value), *widths]) + sum(widths)
        refuse_over(self.made, "str.format")
        return super().format_field(value, format_spec)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """An ImmutableSandboxedEnvironment (as HF transformers renders chat templates: trim_blocks,
    lstrip_blocks, loop controls) whose renders are bounded as the module docstring says."""

    code_generator_class = BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                         finalize=self.printed)
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}
        lipsum = self.globals["lipsum"]

        def bounded_lipsum(n=5, html=True, min=20, max=100):
            refuse_over(_number(n) * _number(max) * 12, "lipsum")  # words of at most 12 characters
            return lipsum(n, html, min, max)
        self.globals["lipsum"] = bounded_lipsum
        self.globals["raise_exception"] = raise_exception
        self._state = threading.local()

    # -- the budget of the render running on this thread --

    @contextmanager
    def budget(self):
        self._state.budget = Budget()
        try:
            yield self._state.budget
        finally:
            self._state.budget = None

    def created(self, value):
        """Count a new value against the bounds (its size, or each item later if it is lazy)."""
        if isinstance(value, Iterator) and not isinstance(value, (str, bytes)):
            return self._counted(value)
        n = size(value)
        refuse_over(n, "value")
        self._state.budget.spend(n)
        return value

    def _counted(self, items):
        for item in items:
            yield self.created(item)

    def tick(self):
        self._state.budget.tick()

    # -- hooks called by the compiled template --

    def call_binop(self, context, operator_name, left, right):
        check_binop(operator_name, left, right)
        return self.created(super().call_binop(context, operator_name, left, right))

    def join_operands(self, operands):
        refuse_over(sum(size(x) for x in operands), "'~'")
        return self.created("".join(map(str, operands)))

    def literal(self, value):
        refuse_over(size(value), "literal")
        self._state.budget.spend(len(value))
        return value

    def printed(self, value):
        refuse_over(size(value), "output")
        return value

    def concat(self, pieces):
        """Joins the output of a block ({% set %}...{% endset %}, a macro's body, a filter block)."""
        pieces, total = list(pieces), 0
        for piece in pieces:
            total += len(piece)
            refuse_over(total, "output")
        return self.created("".join(pieces))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's convention: free names for kwargs)
        if isinstance(__obj, types.BuiltinMethodType) and isinstance(__obj.__self__, VALUE_TYPES):
            name = __obj.__name__
            if name not in READ_METHODS and name not in METHOD_SIZES:
                raise ChatTemplateError(f"the chat template calls {type(__obj.__self__).__name__}.{name}, "
                                        "which minillm's sandbox does not allow")
            if name == "join":
                args = (_materialized(args[0]),) + args[1:] if args else args
            if name in METHOD_SIZES:
                refuse_over(METHOD_SIZES[name](__obj.__self__, *args, **kwargs), f"{name}()")
        return __self.created(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        """str.format and str.format_map with BoundedFormatter (jinja2's own, but bounded)."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        formatter = BoundedFormatter(self)

        def bounded(*args, **kwargs):
            if value.__name__ == "format_map":
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                args, kwargs = (), args[0]
            return self.created(formatter.vformat(value.__self__, args, kwargs))
        return bounded

    def _bounded_filter(self, name, f):
        """The filter `f`, its result counted, and checked first when FILTER_SIZES lists it."""
        signature = inspect.signature(f)
        skip = 1 if getattr(f, "jinja_pass_arg", None) else 0  # the context/environment jinja2 passes first

        def bounded(*args, **kwargs):
            if name in FILTER_SIZES:
                bound = signature.bind(*args, **kwargs)
                if name in MATERIALIZE:
                    key = MATERIALIZE[name]
                    bound.arguments[key] = _materialized(bound.arguments[key])
                    args, kwargs = bound.args, bound.kwargs
                arguments = bound.args[skip:]
                refuse_over(FILTER_SIZES[name](*arguments, **bound.kwargs), f"filter {name}")
            return self.created(f(*args, **kwargs))
        if skip:
            bounded.jinja_pass_arg = f.jinja_pass_arg
        return bounded


def raise_exception(message):
    """`raise_exception(msg)` for chat templates, as in HF transformers."""
    raise ChatTemplateError(printable(f"chat template: {message}"))


def one_line(error: Exception) -> str:
    text = printable(" ".join(str(error).split()))
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


class ChatTemplate:
    """A chat template compiled in the bounded sandbox; `render(**variables)` is its text."""

    def __init__(self, source):
        if not isinstance(source, str):
            raise ChatTemplateError("the model's chat template is not a string")
        if len(source) > MAX_SOURCE:
            raise ChatTemplateError(f"the model's chat template has {len(source):,} characters "
                                    f"(at most {MAX_SOURCE:,})")
        self.env = BoundedSandbox()
        with self.env.budget():  # constant parts are folded while compiling: the hooks run then too
            try:
                self.template = self.env.from_string(source)
            except MinillmError:
                raise
            except Exception as e:  # the template is foreign code: any failure to compile is its own
                raise ChatTemplateError(f"the model's chat template does not compile: {one_line(e)}") from None

    def render(self, **variables) -> str:
        with self.env.budget() as budget:
            try:
                pieces, total = [], 0
                for piece in self.template.generate(**variables):
                    total += len(piece)
                    refuse_over(total, "output")
                    budget.spend(len(piece))
                    pieces.append(piece)
                return "".join(pieces)
            except MinillmError:
                raise
            except Exception as e:  # the template is foreign code: any error it raises is its own
                raise ChatTemplateError(f"chat template failed: {one_line(e)}") from None

