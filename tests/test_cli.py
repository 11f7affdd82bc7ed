"""The command line as a user meets it: exit codes, one-line errors, JSON output, the chat REPL.

Every command runs in a child process whose working directory is outside the checkout, as a user's
would be (a path relative to the checkout would fail there)."""

import json
import os
import subprocess
import sys
import tempfile

import pytest

OUTSIDE = tempfile.TemporaryDirectory(prefix="minillm-cwd-")  # an empty working directory, removed at exit


def minillm(*args, stdin=None, timeout=120, cwd=None, env=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "minillm", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd or OUTSIDE.name)


def assert_one_line_error(result, code, *words):
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1, result.stderr
    for word in words:
        assert word in error_lines[0], result.stderr


def test_help_is_instant_and_lists_commands():
    result = minillm("--help")
    assert result.returncode == 0
    for command in ("chat", "generate", "tokenize", "info", "list", "fetch", "quantize", "bench", "dump", "compare",
                    "perplexity"):
        assert command in result.stdout


def test_help_imports_neither_numpy_nor_numba():
    """Every command's --help builds the whole parser: no command module may import the runtime at the top."""
    code = ("import sys; from minillm.cli import COMMANDS, main\n"
            "for name in COMMANDS:\n"
            "    try: main([name, '--help'])\n"
            "    except SystemExit: pass\n"
            "print(sorted(m for m in ('numpy', 'numba', 'tokenizers', 'jinja2') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=OUTSIDE.name)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_bench_counts_are_llama_benchs_and_perplexity_states_its_context_once():
    bench = minillm("bench", "--help").stdout
    assert "-n NEW_TOKENS, --new-tokens" in bench and "-p PROMPT_TOKENS" in bench
    perplexity = " ".join(minillm("perplexity", "--help").stdout.split())
    assert "default: 512" in perplexity and "2048" not in perplexity


@pytest.mark.parametrize("command", ["dump", "perplexity", "bench", "info"])
def test_commands_that_never_sample_show_no_sampling_flags(command):
    shown = minillm(command, "--help").stdout
    assert "--bits" in shown and "--threads" in shown
    for flag in ("--temp", "--top-k", "--seed", "--max-tokens", "--stop"):
        assert flag not in shown


@pytest.mark.parametrize("flags, words", [
    (["--temp", "-1"], ["temperature"]),
    (["--top-p", "0"], ["top-p"]),
    (["--top-p", "1.5"], ["top-p"]),
    (["--min-p", "2"], ["min-p"]),
    (["--bits", "3"], ["--bits 3", "4, 8, 16, 32"]),
    (["--ctx-size", "0"], ["--ctx-size"]),
    (["--threads", "0"], ["--threads"]),
    (["--max-tokens", "-1"], ["--max-tokens"]),
    (["--model", "no-such-model"], ["unknown model", "smollm2-135m"]),
])
def test_bad_flag_values_are_usage_errors(tiny_path, flags, words):
    args = ["generate", "hello"] + (["--model", tiny_path] if "--model" not in flags else []) + flags
    assert_one_line_error(minillm(*args), 2, *words)


@pytest.mark.parametrize("flags, words", [(["--parallel", "4"], ["--parallel", "--mem-cap"]),
                                          (["--parallel", "0", "--mem-cap", "40MiB"], ["--parallel", "--mem-cap"]),
                                          (["--parallel", "4", "--mem-cap", "40MiB", "--kv-bits", "8"], ["--kv-bits"])])
def test_info_parallel_takes_what_serve_takes(tiny_path, flags, words):
    assert_one_line_error(minillm("info", "--model", tiny_path, *flags), 2, *words)


def test_a_whitespace_prompt_is_a_prompt(tiny_path):
    result = minillm("generate", "  ", "--raw", "--model", tiny_path, "-n", "2", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["prompt_ids"] == [35, 35]  # two spaces: the tiny vocabulary's byte 0x20


def test_an_empty_prompt_without_tokens_is_refused(tiny_path):
    assert_one_line_error(minillm("generate", "", "--raw", "--model", tiny_path), 1, "no tokens")


def test_unparsable_flag_is_a_usage_error():
    result = minillm("generate", "hi", "--temp", "warm")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_missing_and_corrupt_files_exit_1(tmp_path):
    assert_one_line_error(minillm("generate", "hi", "--model", tmp_path / "none.gguf"), 1, "no such file")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all, just text" * 10)
    assert_one_line_error(minillm("info", "--model", bad), 1, "not a GGUF")


def test_prompt_over_the_context_is_refused(tiny_path):
    assert_one_line_error(minillm("generate", "word " * 50, "--model", tiny_path, "--ctx-size", "16"), 1,
                          "prompt", "--ctx-size")


def test_ctx_size_over_the_model_context_is_refused(tiny_path):
    assert_one_line_error(minillm("generate", "hi", "--model", tiny_path, "--ctx-size", "100000"), 2, "context length")


def generate_json(*args):
    result = minillm("generate", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_generate_json(tiny_path):
    out = generate_json("the cat", "--model", tiny_path, "-n", "5", "--temp", "0")
    assert out["prompt_ids"] and 1 <= len(out["generated_ids"]) <= 5
    assert set(out["timings"]) >= {"time_to_first_token_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "load_s"}
    assert out["memory"]["peak_rss_mib"] > 0
    assert out["model"]["path"] == str(tiny_path.resolve()) and out["model"]["architecture"] == "llama"
    assert out["settings"]["max_tokens"] == 5 and out["settings"]["temperature"] == 0
    assert out["stop_reason"] in ("eos", "length")


def test_without_seed_a_random_one_is_drawn_recorded_and_reproduces(tiny_path):
    first, second = (generate_json("the", "--model", tiny_path, "-n", "8") for _ in range(2))
    assert first["settings"]["seed"] != second["settings"]["seed"]
    again = generate_json("the", "--model", tiny_path, "-n", "8", "--seed", first["settings"]["seed"])
    assert again["generated_ids"] == first["generated_ids"]
    printed = minillm("generate", "the", "--model", tiny_path, "-n", "2", "--seed", "1234")
    assert "seed 1234" in printed.stderr


def test_the_chat_template_is_applied_unless_raw(tiny_path):
    from minillm.gguf import GGUFFile
    from minillm.tokenizer import Tokenizer
    tok = Tokenizer.from_metadata(GGUFFile(tiny_path).metadata)
    templated = generate_json("hello", "--model", tiny_path, "-n", "1", "--system", "be brief")
    assert templated["chat_template"] is True
    assert templated["prompt_ids"] == tok.encode_chat([{"role": "system", "content": "be brief"},
                                                       {"role": "user", "content": "hello"}])
    raw = generate_json("hello", "--raw", "--model", tiny_path, "-n", "1")
    assert raw["chat_template"] is False and raw["prompt_ids"] == tok.encode("hello")
    assert_one_line_error(minillm("generate", "hi", "--raw", "--system", "x", "--model", tiny_path), 2, "--system")


def test_the_prompt_from_a_file_or_standard_input(tiny_path, tmp_path):
    text = "  the cat\nsat \u00e9\n"
    (tmp_path / "p.txt").write_text(text, encoding="utf-8")
    want = generate_json(text, "--raw", "--model", tiny_path, "-n", "1", "--temp", "0")["prompt_ids"]
    for args, stdin in ((["-"], text), (["-f", "-"], text), (["-f", tmp_path / "p.txt"], None),
                        (["--file", "p.txt"], None)):
        result = minillm("generate", *args, "--raw", "--model", tiny_path, "-n", "1", "--temp", "0", "--json",
                         stdin=stdin, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["prompt_ids"] == want, args
    assert_one_line_error(minillm("generate", "hi", "-f", tmp_path / "p.txt", "--model", tiny_path), 2, "not both")
    assert_one_line_error(minillm("generate", "--model", tiny_path), 2, "no prompt")
    assert_one_line_error(minillm("generate", "-f", tmp_path / "none.txt", "--model", tiny_path), 1, "no such file")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    assert_one_line_error(minillm("generate", "-f", tmp_path / "latin1.txt", "--model", tiny_path), 1, "not UTF-8")


def test_stop_strings_across_tokens_are_cut_and_not_printed(tiny_path):
    free = generate_json("the cat", "--raw", "--model", tiny_path, "-n", "12", "--temp", "0")
    text = free["text"]
    # two characters that first occur after the start (the tiny vocabulary spells a character with one or more tokens)
    at = next(i for i in range(1, len(text) - 1) if text.find(text[i:i + 2]) == i)
    stop = text[at:at + 2]
    out = generate_json("the cat", "--raw", "--model", tiny_path, "-n", "12", "--temp", "0", "--stop", "@@",
                        "--stop", stop)
    assert (out["text"], out["stop_reason"], out["stop_string"]) == (text[:at], "stop_string", stop)
    assert out["settings"]["stop"] == ["@@", stop]
    printed = minillm("generate", "the cat", "--raw", "--model", tiny_path, "-n", "12", "--temp", "0", "--stop", stop)
    assert printed.stdout == text[:at] + "\n"
    assert_one_line_error(minillm("generate", "hi", "--model", tiny_path, "--stop", ""), 2, "--stop")


def test_logprobs_in_the_json_record(tiny_path):
    out = generate_json("the cat", "--model", tiny_path, "-n", "4", "--temp", "0", "--logprobs", "2")
    assert len(out["logprobs"]) == len(out["generated_ids"])
    for token_id, entry in zip(out["generated_ids"], out["logprobs"]):
        assert entry["id"] == token_id and entry["logprob"] <= 0 and len(entry["top"]) == 2
        assert entry["top"][0]["id"] == token_id   # greedy
        assert isinstance(entry["piece"], str)
    assert_one_line_error(minillm("generate", "hi", "--model", tiny_path, "--logprobs", "2"), 2, "--json")


def test_n_0_is_refused_with_a_pointer_to_tokenize(tiny_path):
    assert_one_line_error(minillm("generate", "hi", "--model", tiny_path, "-n", "0"), 2, "tokenize")


def test_a_limit_is_marked(tiny_path):
    result = minillm("generate", "the cat", "--raw", "--model", tiny_path, "-n", "3", "--temp", "0",
                     "--stop", "\u2603")   # a stop string the tiny model never writes
    assert result.returncode == 0, result.stderr
    assert "stopped at -n 3" in result.stderr


def test_info_shows_types_parameters_and_memory(tiny_path):
    result = minillm("info", "--model", tiny_path)
    assert result.returncode == 0, result.stderr
    for words in ("Q8_0", "F32", "parameters", "as stored", "as loaded", "KV cache", "tied"):
        assert words in result.stdout


def test_info_draws_the_attention_layout(tiny_path, tmp_path):
    result = minillm("info", "--model", tiny_path, "-c", "256", "--block-size", "32",
                     "--attention", "sinks:4,window:60/bigbird:32,32,1", "--png", "layout.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    png = (tmp_path / "layout.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 2 * height * 0.99   # two panels side by side
    lines = [line for line in result.stdout.splitlines() if line.startswith("attention")]
    assert len(lines) == 2 and lines[0].split("over")[1] != lines[1].split("over")[1]


def test_the_summary_line_tells_apart_layouts_with_as_many_blocks():
    """The issue's pair: both compute 177 of 32 x 32 blocks at 2048 positions."""
    from minillm.attention import parse_attention
    a, b = (parse_attention(text).pattern(0).layout(2048) for text in ("sinks:4,window:252", "bigbird:128,64,2"))
    assert a.active.sum() == b.active.sum()
    assert a.summary().split("over")[1] != b.summary().split("over")[1]


def test_tokenize(tiny_path):
    from minillm.gguf import GGUFFile
    from minillm.tokenizer import Tokenizer
    tok = Tokenizer.from_metadata(GGUFFile(tiny_path).metadata)
    text = "Hello wörld 🙂"
    result = minillm("tokenize", text, "--model", tiny_path, "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["ids"] == tok.encode(text) and out["n_tokens"] == len(out["ids"])
    assert "".join(out["pieces"]).startswith("Hello w") and "\\x" in "".join(out["pieces"])  # 🙂 split in bytes
    ids = minillm("tokenize", "-", "--model", tiny_path, "--ids", stdin=text)
    assert json.loads(ids.stdout) == tok.encode(text)
    plain = minillm("tokenize", "hi", "--model", tiny_path)
    assert plain.stdout.splitlines() == [f"{i:>7} -> {chr(i - 3)!r}" for i in tok.encode("hi")]
    chat = minillm("tokenize", "hi", "--chat", "--model", tiny_path, "--ids")
    assert json.loads(chat.stdout) == tok.encode_chat([{"role": "user", "content": "hi"}])


def test_list_shows_known_and_fetched_models(tiny_path, tmp_path):
    import shutil
    shutil.copy(tiny_path, tmp_path / "my-model.gguf")
    result = minillm("list", "--json", env={"MINILLM_WEIGHTS_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    rows = {row["name"]: row for row in out["models"]}
    assert rows["smollm2-135m"]["license"] == "Apache-2.0" and rows["smollm2-135m"]["fetched"] is False
    assert rows["my-model.gguf"]["fetched"] and rows["my-model.gguf"]["path"] == str(tmp_path / "my-model.gguf")
    assert rows["my-model.gguf"]["size_mib"] == (tmp_path / "my-model.gguf").stat().st_size / 2**20
    text = minillm("list", env={"MINILLM_WEIGHTS_DIR": str(tmp_path)}).stdout
    assert "smollm2-135m" in text and "not fetched: minillm fetch smollm2-135m" in text and "my-model.gguf" in text


def test_version():
    from minillm import __version__
    result = minillm("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"minillm {__version__}"


def json_keys(value, prefix=""):
    """Every key of a JSON value, nested ones as a.b."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield f"{prefix}{key}"
            yield from json_keys(item, f"{prefix}{key}.")
    elif isinstance(value, list):
        for item in value:
            yield from json_keys(item, prefix)


@pytest.mark.parametrize("command", [["generate", "hi", "-n", "2"], ["info"], ["tokenize", "hi"], ["list"],
                                     ["bench", "-p", "4", "-n", "2", "-r", "1"], ["perplexity", "-c", "16"]])
def test_every_json_record_has_the_same_head_and_units_in_its_keys(tiny_q4_path, tmp_path, command):
    args = list(command)
    if command[0] == "perplexity":
        (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog " * 20)
        args.insert(1, tmp_path / "text.txt")
    model = [] if command[0] == "list" else ["--model", tiny_q4_path]
    result = minillm(*args, *model, "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["command"] == command[0] and out["minillm_version"]
    if command[0] != "list":
        assert out["model"]["path"] == str(tiny_q4_path.resolve())
    if command[0] in ("generate", "bench", "perplexity", "info"):
        assert out["settings"]["threads"] >= 1
    for key in json_keys(out):
        assert not key.endswith(("_mb", "_seconds", "_second", "_time", "_bytes")), key


def test_chat_repl_reset_and_eof(tiny_path):
    result = minillm("chat", "--model", tiny_path, "-n", "4", "--temp", "0", stdin="hello\n/reset\nagain\n")
    assert result.returncode == 0, result.stderr
    assert "conversation cleared" in result.stderr
    assert "Traceback" not in result.stderr


def test_chat_commands_are_caught_not_sent(tiny_path):
    stdin = "/help\n/stats\n/nonsense here\nhello\n/stats\n"
    result = minillm("chat", "--model", tiny_path, "-n", "3", "--temp", "0", "--verbose", "--stop", "\u2603",
                     stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert "/stats" in result.stderr and "/reset" in result.stderr        # /help listed the commands
    assert "no answer yet" in result.stderr
    assert "unknown command /nonsense" in result.stderr
    assert result.stdout.count("[stopped at -n 3]") == 1                   # one message reached the model
    assert result.stderr.count("first token after") == 2                   # --verbose, then /stats
    assert "context: " in result.stderr.splitlines()[-1]


def test_chat_exit_command(tiny_path):
    result = minillm("chat", "--model", tiny_path, "-n", "4", stdin="/exit\nnever read\n")
    assert result.returncode == 0, result.stderr


# "What is the capital of France?" alone starts its answer on a near-tie ("The" leads "L" by 0.08
# in float32 logits, 0.05 at --bits 4, where int8 rounding can flip it). Asked for one sentence,
# SmolLM2 answers "The capital of France is Paris." with every token ahead of the next best by at
# least 1.48 logits in float32 and 1.42 at --bits 4: rounding moves logits by about 0.1.
PARIS_QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.mark.weights
@pytest.mark.parametrize("bits", ["32", "4"])
def test_generate_on_smollm2_says_paris(smollm2_path, bits):
    result = minillm("generate", PARIS_QUESTION, "--temp", "0", "-n", "16",
                     "--model", smollm2_path, "--threads", "1", "--bits", bits)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The capital of France is Paris."


def test_progress_bars_are_quiet_when_stderr_is_not_a_terminal(tiny_path, tmp_path):
    """Converting weights at load and quantizing show tqdm bars on a terminal; a pipe gets none."""
    quantized = minillm("quantize", tiny_path, tmp_path / "q8.gguf", "--bits", "8")
    assert quantized.returncode == 0, quantized.stderr
    converted = minillm("generate", "hi", "--model", tiny_path, "--bits", "8", "-n", "1")
    assert converted.returncode == 0, converted.stderr
    for stderr in (quantized.stderr, converted.stderr):
        assert "%|" not in stderr and "it/s" not in stderr and "tensor/s" not in stderr
