"""Sampling stages as properties, the generation loop on the tiny model, and chat cache reuse."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minillm.attention import parse_attention
from minillm.chat import ChatSession, common_prefix_length
from minillm.errors import MinillmError, UsageError
from minillm.generate import (Completion, GenerationStats, Sampler, SamplingSettings, StopStrings,
                              apply_repetition_penalty, generate, keep_min_p, keep_top_k, keep_top_p, log_softmax,
                              sort_candidates)
from minillm.gguf import GGUFFile
from minillm.kvcache import KVCache, PatternKVCache
from minillm.model import load_float_model
from minillm.tokenizer import Tokenizer

GREEDY = SamplingSettings(temperature=0)
# Every filter off: the draw follows softmax(logits / temperature) over the whole vocabulary.
UNFILTERED = dict(top_k=0, top_p=1.0, min_p=0.0)

# Float32 logits like the model's, with many exact ties from the small integers.
logit_arrays = arrays(np.float32, st.integers(1, 40),
                      elements=st.one_of(st.integers(-4, 4).map(float), st.floats(-30, 30, width=32)))


def probabilities(logits):
    """Softmax in float64, written out independently of minillm.generate."""
    e = np.exp(logits.astype(np.float64) - logits.max())
    return e / e.sum()


# --- sampler stages ---------------------------------------------------------------------------

@given(logits=logit_arrays, data=st.data(), penalty=st.floats(0.1, 4.0))
def test_repetition_penalty_divides_positive_and_multiplies_negative_logits(logits, data, penalty):
    recent = np.array(data.draw(st.lists(st.integers(0, len(logits) - 1), max_size=10)), dtype=np.int64)
    out = apply_repetition_penalty(logits, recent, penalty)
    for i, (before, after) in enumerate(zip(logits.astype(np.float64), out)):
        if i not in recent:
            assert after == before
        elif before > 0:
            assert after == before / penalty   # once, however often i appears in `recent`
        else:
            assert after == before * penalty


def test_repetition_penalty_looks_back_only_repeat_last_n_tokens():
    logits = np.array([2.0, 1.9, 0.0, 0.0], np.float32)
    sampler = Sampler(SamplingSettings(temperature=0, repeat_penalty=2.0, repeat_last_n=3))
    assert sampler(logits, [0, 3, 3, 3]) == 0   # 0 is 4 tokens back: not penalised
    assert sampler(logits, [3, 0, 3, 3]) == 1   # 0 is in the window: 2.0 / 2 < 1.9


@given(logits=logit_arrays, k=st.integers(0, 45))
def test_top_k_keeps_the_k_highest_logits_ties_to_the_lower_id(logits, k):
    ids, kept = keep_top_k(*sort_candidates(logits), k)
    n = len(logits) if k == 0 else min(k, len(logits))
    assert len(ids) == n and np.array_equal(kept, logits[ids])
    dropped = np.setdiff1d(np.arange(len(logits)), ids)
    for i in dropped:   # every dropped id is lower, or tied and later in the vocabulary
        assert logits[i] < kept.min() or (logits[i] == kept.min() and i > ids[kept == kept.min()].max())


@given(logits=logit_arrays, p=st.floats(0, 1, exclude_min=True, exclude_max=True))
def test_top_p_keeps_the_smallest_prefix_reaching_p(logits, p):
    sorted_ids, sorted_logits = sort_candidates(logits)
    ids, _ = keep_top_p(sorted_ids, sorted_logits, p)
    n = len(ids)
    cumulative = np.cumsum(probabilities(sorted_logits))
    assert n >= 1 and np.array_equal(ids, sorted_ids[:n])
    assert cumulative[n - 1] >= p or n == len(logits)   # rounding can leave the total just below p
    assert n == 1 or cumulative[n - 2] < p


@pytest.mark.parametrize("p, kept", [(0.25, 1), (0.5, 2), (0.75, 3), (0.5000001, 3), (0.4999999, 2)])
def test_top_p_stops_at_a_sum_equal_to_p(p, kept):
    """Four equal logits: each probability is 1/4 and the sums 1/4, 1/2, 3/4 are exact. A sum that
    equals p reaches it, so no further candidate is kept (llama.cpp: cum_sum >= p). Random logits
    almost never sum to p exactly, so only a case made for it tells >= from >."""
    ids, _ = keep_top_p(*sort_candidates(np.zeros(4, np.float32)), p)
    assert ids.tolist() == list(range(kept))


@given(logits=logit_arrays)
def test_top_p_of_one_keeps_everything(logits):
    ids, _ = keep_top_p(*sort_candidates(logits), 1.0)
    assert len(ids) == len(logits)


@given(logits=logit_arrays, min_p=st.floats(0, 1))
def test_min_p_keeps_the_tokens_at_least_min_p_times_as_likely_as_the_best(logits, min_p):
    probs = probabilities(logits)
    ids, _ = keep_min_p(*sort_candidates(logits), min_p)
    assert set(ids.tolist()) == set(np.flatnonzero(probs >= min_p * probs.max()).tolist())
    if min_p == 1:
        assert set(ids.tolist()) == set(np.flatnonzero(logits == logits.max()).tolist())


@given(logits=logit_arrays)
def test_temperature_zero_is_argmax_with_ties_to_the_lowest_id(logits):
    assert Sampler(GREEDY)(logits, []) == int(np.flatnonzero(logits == logits.max())[0])


def test_same_seed_gives_the_same_sequence():
    logits = np.random.default_rng(1).standard_normal(300).astype(np.float32)
    a, b = Sampler(SamplingSettings(seed=7)), Sampler(SamplingSettings(seed=7))
    assert [a(logits, []) for _ in range(50)] == [b(logits, []) for _ in range(50)]


def test_different_seeds_differ_on_a_flat_distribution():
    flat = np.zeros(1000, np.float32)
    a, b = (Sampler(SamplingSettings(seed=seed, temperature=1.0, **UNFILTERED)) for seed in (0, 1))
    assert [a(flat, []) for _ in range(20)] != [b(flat, []) for _ in range(20)]


@pytest.mark.parametrize("settings, probs, want", [
    # no filter at temperature 1: the draw follows the model's own probabilities
    (SamplingSettings(temperature=1.0, **UNFILTERED), [0.5, 0.3, 0.2], [0.5, 0.3, 0.2]),
    # top-p 0.85 keeps 0.4, 0.3, 0.2 (sum 0.9); min-p 0.6 then needs p >= 0.24: 0.4 and 0.3 stay;
    # temperature 0.5 squares them: 0.16 : 0.09 = 0.64 : 0.36
    (SamplingSettings(temperature=0.5, top_k=0, top_p=0.85, min_p=0.6), [0.4, 0.3, 0.2, 0.1], [0.64, 0.36, 0, 0]),
    # top-k 2 keeps 0.4 and 0.3; temperature 2 takes square roots: sqrt(.4) : sqrt(.3)
    (SamplingSettings(temperature=2.0, top_k=2, top_p=1.0, min_p=0.0), [0.4, 0.3, 0.2, 0.1],
     [math.sqrt(0.4) / (math.sqrt(0.4) + math.sqrt(0.3)), math.sqrt(0.3) / (math.sqrt(0.4) + math.sqrt(0.3)), 0, 0]),
])
def test_sampled_frequencies_match_the_filtered_probabilities(settings, probs, want):
    """Each count is Binomial(N, want[i]): it lies within 5 standard deviations of N * want[i]
    except with probability below 1e-6 per token. Removed tokens are never drawn."""
    N = 10_000
    sampler = Sampler(settings)
    logits = np.log(np.array(probs, np.float32))
    counts = np.bincount([sampler(logits, []) for _ in range(N)], minlength=len(probs))
    for count, p in zip(counts, want):
        assert abs(count - N * p) <= 5 * math.sqrt(N * p * (1 - p))


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.01),
    ("min_p", 1.01), ("top_k", -1), ("repeat_penalty", 0.0), ("repeat_penalty", -1.0), ("repeat_last_n", -1),
    ("seed", -1),
])
def test_bad_settings_raise_usage_error_naming_the_flag(field, value):
    flag = "--temp" if field == "temperature" else "--" + field.replace("_", "-")
    with pytest.raises(UsageError, match=flag) as error:
        Sampler(SamplingSettings(**{field: value}))
    assert error.value.exit_code == 2


def test_boundary_settings_are_accepted():
    SamplingSettings(temperature=0, top_k=0, top_p=1.0, min_p=1.0, repeat_last_n=0).check()
    SamplingSettings(min_p=0.0).check()


def test_non_finite_logits_raise():
    with pytest.raises(MinillmError, match="non-finite"):
        Sampler(SamplingSettings())(np.array([0.0, np.nan], np.float32), [])


# --- the generation loop on the tiny model -------------------------------------------------------

PROMPT = "Hello there, tiny model"


@pytest.fixture(scope="module")
def tiny(tiny_path):
    gguf = GGUFFile(tiny_path)
    return load_float_model(gguf), Tokenizer.from_metadata(gguf.metadata)


def greedy_ids(model, prompt, n, *, max_len=None, stop_ids=frozenset(), stats=None):
    cache = KVCache(model.config, max_len or len(prompt) + n)
    ids = list(generate(model, cache, prompt, Sampler(GREEDY), max_tokens=n, stop_ids=stop_ids, stats=stats))
    return ids, cache


def test_greedy_generation_equals_argmax_of_uncached_forward_passes(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode(PROMPT)
    want = []
    for _ in range(6):
        logits = model.forward(prompt + want, KVCache(model.config, len(prompt) + 6))  # (T, vocab_size)
        want.append(int(np.argmax(logits[-1])))
    assert greedy_ids(model, prompt, 6)[0] == want


def test_a_stop_id_ends_generation_and_is_not_yielded(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode(PROMPT)
    free, _ = greedy_ids(model, prompt, 12)
    k = max(i for i, token in enumerate(free) if token not in free[:i])  # the last new id: not seen before it
    assert k > 0
    stats = GenerationStats()
    ids, cache = greedy_ids(model, prompt, 12, stop_ids={free[k]}, stats=stats)
    assert ids == free[:k]
    assert (stats.stop_reason, stats.generated_tokens, cache.length) == ("eos", k, len(prompt) + k)


def test_generation_stops_after_max_tokens_and_fills_stats(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode(PROMPT)
    stats = GenerationStats()
    ids, cache = greedy_ids(model, prompt, 5, max_len=len(prompt) + 50, stats=stats)
    assert len(ids) == 5 and cache.length == len(prompt) + 4   # the last id is yielded, never fed
    assert (stats.stop_reason, stats.prompt_tokens, stats.generated_tokens, stats.decode_steps) == ("length", len(prompt), 5, 4)
    assert stats.prefill_seconds > 0 and stats.decode_seconds > 0
    assert stats.time_to_first_token >= stats.prefill_seconds
    assert stats.prefill_tokens_per_second > 0 and stats.decode_tokens_per_second > 0


def test_generation_stops_when_the_context_is_full(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode(PROMPT)
    free, _ = greedy_ids(model, prompt, 10)
    stats = GenerationStats()
    ids, cache = greedy_ids(model, prompt, 10, max_len=len(prompt) + 3, stats=stats)
    assert ids == free[:4]   # 3 fed back, and the 4th sampled from the last position
    assert stats.stop_reason == "context" and cache.length == cache.max_len


def test_stopping_early_leaves_the_cache_holding_exactly_the_fed_tokens(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode(PROMPT)
    free, _ = greedy_ids(model, prompt, 8)
    cache, stats = KVCache(model.config, len(prompt) + 8), GenerationStats()
    tokens = generate(model, cache, prompt, Sampler(GREEDY), max_tokens=8, stop_ids=frozenset(), stats=stats)
    assert list(itertools.islice(tokens, 3)) == free[:3]
    tokens.close()   # what a consumer's Ctrl-C does to the generator
    assert stats.stop_reason == "interrupted" and cache.length == len(prompt) + 2
    rest = generate(model, cache, free[2:3], Sampler(GREEDY), max_tokens=5, stop_ids=frozenset(),
                    earlier_ids=prompt + free[:2])
    assert list(rest) == free[3:]


def test_bad_generation_arguments_raise(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode(PROMPT)
    with pytest.raises(UsageError, match="--max-tokens"):
        greedy_ids(model, prompt, 0)
    with pytest.raises(MinillmError, match="context"):
        greedy_ids(model, prompt, 4, max_len=len(prompt) - 1)


# --- the text of a generation: stop strings, unfinished characters, log-probabilities -------------

@given(text=st.text(max_size=40), cuts=st.lists(st.integers(0, 40), max_size=8), data=st.data())
def test_stop_strings_end_the_text_before_the_first_one_however_it_arrives(text, cuts, data):
    """Pushed in any pieces, the shown text is the text up to the earliest stop string (all of it
    when none occurs), and the stop string itself is never shown."""
    def stop_string():
        if not text:
            return data.draw(st.text(min_size=1, max_size=4))
        start = data.draw(st.integers(0, len(text) - 1))
        return data.draw(st.one_of(st.integers(start + 1, len(text)).map(lambda end: text[start:end]),
                                   st.text(min_size=1, max_size=4)))
    stops = [stop_string() for _ in range(data.draw(st.integers(1, 3)))]
    bounds = [0, *sorted(c for c in cuts if c <= len(text)), len(text)]
    filter_ = StopStrings(stops)
    shown = "".join(filter_.push(text[a:b]) for a, b in zip(bounds, bounds[1:]))
    if filter_.found is None:
        shown += filter_.flush()
    hits = [text.find(stop) for stop in stops if stop in text]
    assert shown == (text[:min(hits)] if hits else text)
    assert (filter_.found is not None) == bool(hits)


class ScriptedModel:
    """The real model, with each step's logits pushed so far towards the next id of `script` that
    greedy sampling picks it: a way to make it generate a chosen text."""

    def __init__(self, model, script):
        self.model, self.config, self.script = model, model.config, list(script)

    def forward(self, ids, cache, last_only=False):
        logits = self.model.forward(ids, cache, last_only=last_only).copy()
        logits[-1, self.script.pop(0)] += 1e4
        return logits

    def prefill(self, ids, cache):
        return self.forward(ids, cache, last_only=True)


def scripted_completion(tiny, script, max_tokens, **options):
    model, tokenizer = tiny
    prompt = tokenizer.encode(PROMPT)
    completion = Completion(tokenizer, **options)
    shown = "".join(completion.run(ScriptedModel(model, script), KVCache(model.config, 256), prompt,
                                   Sampler(GREEDY), max_tokens=max_tokens))
    assert shown == completion.text
    return completion


def test_a_character_cut_at_the_limit_is_dropped_not_shown_as_a_replacement(tiny):
    _, tokenizer = tiny
    script = tokenizer.encode("ab🙂")           # the tiny vocabulary spells 🙂 as its 4 bytes
    assert len(script) == 6
    cut = scripted_completion(tiny, script, max_tokens=4)
    assert (cut.text, cut.stats.stop_reason, len(cut.ids)) == ("ab", "length", 4)
    whole = scripted_completion(tiny, script, max_tokens=6)
    assert whole.text == "ab🙂"
    # Ended by the model (end of text) inside a character, the bytes are invalid: U+FFFD, as decode gives.
    ended = scripted_completion(tiny, script[:4] + [tokenizer.eos_id], max_tokens=8)
    assert ended.stats.stop_reason == "eos" and ended.text == tokenizer.decode(script[:4]) == "ab\ufffd"


def test_a_stop_string_across_tokens_ends_the_text_before_it(tiny):
    _, tokenizer = tiny
    script = tokenizer.encode("hello world. more text")
    done = scripted_completion(tiny, script, max_tokens=len(script), stop_strings=["ld. m", "zzz"])
    assert (done.text, done.stop_string, done.stats.stop_reason) == ("hello wor", "ld. m", "stop_string")
    assert tokenizer.decode(done.ids).endswith("ld. m")   # generation ran until the stop string was complete


def test_logprobs_are_the_models_own_distribution(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode(PROMPT)
    completion = Completion(tokenizer, top_logprobs=3)
    "".join(completion.run(model, KVCache(model.config, 64), prompt, Sampler(GREEDY), max_tokens=4))
    want = log_softmax(model.forward(prompt, KVCache(model.config, 64), last_only=True)[-1])  # as generate runs it
    first = completion.logprobs[0]
    assert first.logprob == want[first.id]
    assert [i for i, _ in first.top] == list(np.argsort(-want, kind="stable")[:3])
    assert len(completion.logprobs) == len(completion.ids)
    for entry in completion.logprobs:   # greedy: the chosen id is the most likely one
        assert entry.top[0][0] == entry.id and len(entry.top) == 3
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)


# --- chat ----------------------------------------------------------------------------------------

class RecordingModel:
    """The real model, recording the ids of every forward call; optionally raising
    KeyboardInterrupt (as Ctrl-C would) instead of running call number `interrupt_at`."""

    def __init__(self, model, interrupt_at=None):
        self.model, self.config = model, model.config
        self.calls, self.interrupt_at = [], interrupt_at

    def forward(self, ids, cache, last_only=False):
        if len(self.calls) == self.interrupt_at:
            self.interrupt_at = None
            raise KeyboardInterrupt
        self.calls.append(list(ids))
        return self.model.forward(ids, cache, last_only=last_only)

    def prefill(self, ids, cache):
        return self.forward(ids, cache, last_only=True)


def chat(model, tokenizer, *, ctx_size=256, max_tokens=8, system=None):
    return ChatSession(model, tokenizer, Sampler(GREEDY), ctx_size=ctx_size, max_tokens=max_tokens, system=system)


def from_scratch(model, tokenizer, messages, max_tokens):
    """Greedy answer ids for the conversation rendered in full, in a fresh cache."""
    prompt = tokenizer.encode_chat(messages)
    return greedy_ids(model, prompt, max_tokens, stop_ids=tokenizer.stop_ids)[0]


def answer_ids(session, messages):
    """The ids the session generated after the rendering of `messages` (the conversation up to
    the latest user message), checking that the session's ids start with that rendering."""
    prompt = session.tokenizer.encode_chat(messages)
    assert session.ids[:len(prompt)] == prompt
    return session.ids[len(prompt):]


def test_a_second_turn_prefills_only_the_tokens_not_in_the_cache(tiny):
    model, tokenizer = tiny
    recorder = RecordingModel(model)
    session = chat(recorder, tokenizer)
    first_prompt = tokenizer.encode_chat([{"role": "user", "content": "hi there"}])
    "".join(session.reply("hi there"))
    cached = session.ids[:session.cache.length]
    recorder.calls.clear()
    "".join(session.reply("and then?"))
    prompt = tokenizer.encode_chat(session.messages[:-1])
    reused = common_prefix_length(cached, prompt)
    assert reused >= len(first_prompt)   # at least the whole first prompt is never run again
    assert recorder.calls[0] == prompt[reused:]
    assert all(len(call) == 1 for call in recorder.calls[1:])


def test_a_second_turn_answers_as_a_from_scratch_run_on_the_whole_conversation(tiny):
    model, tokenizer = tiny
    session = chat(model, tokenizer, system="You are tiny.")
    "".join(session.reply("hi there"))
    text = "".join(session.reply("and then?"))
    messages = session.messages[:-1]
    assert answer_ids(session, messages) == from_scratch(model, tokenizer, messages, 8)
    assert text == session.messages[-1]["content"]


def test_old_turns_are_dropped_to_fit_the_context(tiny):
    model, tokenizer = tiny
    session = chat(model, tokenizer, ctx_size=100, system="Be brief.")
    questions = ["first question", "second question", "third question", "fourth question"]
    for question in questions:
        "".join(session.reply(question))
    assert session.notices and session.notices[0].startswith("dropped the")
    assert session.messages[0] == {"role": "system", "content": "Be brief."}
    users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert users == questions[-len(users):] and len(users) < len(questions)
    messages = session.messages[:-1]
    assert len(tokenizer.encode_chat(messages)) + 8 <= 100
    assert answer_ids(session, messages) == from_scratch(model, tokenizer, messages, 8)


def test_a_message_too_long_for_the_context_raises_and_changes_nothing(tiny):
    model, tokenizer = tiny
    session = chat(model, tokenizer, ctx_size=96)
    "".join(session.reply("hi"))
    before = [dict(m) for m in session.messages]
    with pytest.raises(MinillmError, match="context size 96"):
        "".join(session.reply("x" * 200))
    assert session.messages == before
    "".join(session.reply("hi again"))
    assert session.messages[:2] == before and session.messages[2]["content"] == "hi again"


def test_reset_starts_the_conversation_again(tiny):
    model, tokenizer = tiny
    fresh = chat(model, tokenizer, system="S")
    first = "".join(fresh.reply("hello"))
    session = chat(model, tokenizer, system="S")
    "".join(session.reply("something else"))
    session.reset()
    assert session.messages == [{"role": "system", "content": "S"}] and session.cache.length == 0
    assert "".join(session.reply("hello")) == first and session.ids == fresh.ids


def test_a_reply_closed_by_the_consumer_keeps_the_partial_answer(tiny):
    model, tokenizer = tiny
    recorder = RecordingModel(model)
    session = chat(recorder, tokenizer, max_tokens=12)
    reply = session.reply("hi there")
    pieces = list(itertools.islice(reply, 3))
    reply.close()
    assert session.last_stats.stop_reason == "interrupted"
    assert session.messages[-1] == {"role": "assistant", "content": "".join(pieces)}
    fed = [token for call in recorder.calls for token in call]
    assert fed == session.ids[:session.cache.length]
    "".join(session.reply("go on"))
    messages = session.messages[:-1]
    assert answer_ids(session, messages) == from_scratch(model, tokenizer, messages, 12)


def test_a_keyboard_interrupt_inside_the_model_leaves_the_session_consistent(tiny):
    model, tokenizer = tiny
    session = chat(RecordingModel(model, interrupt_at=4), tokenizer)
    with pytest.raises(KeyboardInterrupt):
        "".join(session.reply("hi there"))
    assert session.last_stats.stop_reason == "interrupted"
    assert session.cache.length == len(tokenizer.encode_chat(session.messages[:1])) + 3  # prefill + 3 decode steps
    "".join(session.reply("go on"))
    messages = session.messages[:-1]
    assert answer_ids(session, messages) == from_scratch(model, tokenizer, messages, 8)


def test_a_stop_string_ends_a_chat_answer_and_is_not_kept(tiny):
    model, tokenizer = tiny
    script = tokenizer.encode("Sure. STOP here")
    session = ChatSession(ScriptedModel(model, script), tokenizer, Sampler(GREEDY), ctx_size=256, max_tokens=20,
                          stop_strings=["STOP"])
    assert "".join(session.reply("hi")) == "Sure. "
    assert session.messages[-1] == {"role": "assistant", "content": "Sure. "}
    assert session.last_stats.stop_reason == "stop_string"


def test_chat_on_a_ring_cache_reruns_what_the_ring_no_longer_holds(tiny):
    """--attention sinks:4,window:32: each turn overwrites positions of the last, so the prefix a
    turn may keep is only what the ring still holds (PatternKVCache.truncate goes back to the
    sinks). Every answer equals a from-scratch run on a fresh ring cache, and the later turns
    prefill from the sinks on, not from the end of the prefix they share with the last turn."""
    model, tokenizer = tiny
    spec = parse_attention("sinks:4,window:32", 32)
    recorder = RecordingModel(model)
    session = ChatSession(recorder, tokenizer, Sampler(GREEDY), ctx_size=128, max_tokens=8,
                          cache=PatternKVCache(model.config, 128, spec))
    restarts = 0
    for question in ["hi there", "and then?", "tell me more", "thanks", "bye"]:
        recorder.calls.clear()
        "".join(session.reply(question))
        messages = session.messages[:-1]
        prompt = tokenizer.encode_chat(messages)
        fresh = PatternKVCache(model.config, 128, spec)
        want = list(generate(model, fresh, prompt, Sampler(GREEDY), max_tokens=8, stop_ids=tokenizer.stop_ids))
        assert answer_ids(session, messages) == want
        restarts += recorder.calls[0] == prompt[4:]
    assert restarts >= 2


# --- the real model ------------------------------------------------------------------------------

@pytest.mark.weights
def test_smollm2_knows_the_capital_of_france(smollm2_path):
    gguf = GGUFFile(smollm2_path)
    session = ChatSession(load_float_model(gguf), Tokenizer.from_metadata(gguf.metadata), Sampler(GREEDY),
                          ctx_size=256, max_tokens=32)
    # asked for one sentence, every answer token leads by 1.48 logits or more (tests/test_cli.py)
    assert "".join(session.reply("What is the capital of France? Answer in one sentence.")) == \
        "The capital of France is Paris."
