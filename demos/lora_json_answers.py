"""Demo: teach SmolLM2 an answer format with LoRA, and measure it before and after on held-out questions.

The task: answer a short question with one line of JSON, {"answer": "..."}, and nothing else; the
prompt does not ask for it, so only training can make the model do it. Questions are of four kinds
(sums, capitals, opposites, plurals); the held-out ones use numbers, countries and words that no
training question has. Each answer is generated greedily (up to 24 tokens, until the end of the
turn) by minillm with and without the adapter, and by llama.cpp with the same adapter file
(llama-cpp-python's lora_path), when llama_cpp is installed. Measured: the rate of compliant
answers (the whole answer parses as JSON with exactly the key "answer" holding a string) and of
correct ones (compliant, with the expected value).

    python demos/lora_json_answers.py [--model PATH] [--steps 40] [--workdir DIR] [--json-out FILE]

It trains a rank-8 adapter on every linear for 40 steps of 8 conversations (both cores, a few
minutes on the 2-core machine) and writes DIR/train.jsonl, DIR/heldout.jsonl and DIR/adapter.gguf.
"""

import os

# As the minillm command does, before NumPy starts BLAS: one BLAS thread a call, since training
# splits each batch over threads itself (two BLAS threads under each would fight for the cores).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

COUNTRIES = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
             ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"),
             ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Norway", "Oslo"),
             ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
             ("Hungary", "Budapest"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Cuba", "Havana"),
             ("Thailand", "Bangkok"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("Belgium", "Brussels"),
             ("Denmark", "Copenhagen"), ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
             ("South Korea", "Seoul"), ("Vietnam", "Hanoi"), ("Colombia", "Bogota"), ("Nigeria", "Abuja"),
             ("Australia", "Canberra"), ("Brazil", "Brasilia"), ("Switzerland", "Bern"), ("Netherlands", "Amsterdam"),
             ("Czech Republic", "Prague")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"), ("light", "dark"),
             ("old", "young"), ("open", "closed"), ("hard", "soft"), ("early", "late"), ("full", "empty"),
             ("strong", "weak"), ("rich", "poor"), ("wet", "dry"), ("long", "short"), ("high", "low"),
             ("clean", "dirty"), ("loud", "quiet"), ("thick", "thin"), ("heavy", "light"), ("inside", "outside"),
             ("win", "lose"), ("buy", "sell"), ("true", "false"), ("first", "last"), ("push", "pull")]
PLURALS = [("cat", "cats"), ("dog", "dogs"), ("child", "children"), ("mouse", "mice"), ("box", "boxes"),
           ("city", "cities"), ("tooth", "teeth"), ("foot", "feet"), ("knife", "knives"), ("leaf", "leaves"),
           ("baby", "babies"), ("bus", "buses"), ("woman", "women"), ("man", "men"), ("goose", "geese"),
           ("apple", "apples"), ("house", "houses"), ("church", "churches"), ("wolf", "wolves"), ("person", "people"),
           ("sheep", "sheep"), ("fish", "fish"), ("potato", "potatoes"), ("story", "stories")]
PHRASES = {
    "sum": ["What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}.", "How much is {a} plus {b}?"],
    "capital": ["What is the capital of {x}?", "Which city is the capital of {x}?", "Name the capital of {x}."],
    "opposite": ["What is the opposite of '{x}'?", "Give the opposite of the word {x}.", "What is the antonym of {x}?"],
    "plural": ["What is the plural of '{x}'?", "Give the plural of the word {x}.", "How do you write more than one {x}?"],
}


def questions(rng, held_out: bool, n: int) -> list[tuple[str, str]]:
    """n (question, answer) pairs; the held-out ones use the last quarter of each list and sums of
    numbers from 50 to 99 (training: 1 to 49), so no held-out question was seen in training."""
    def part(items):
        cut = len(items) * 3 // 4
        return items[cut:] if held_out else items[:cut]
    pairs = []
    for i in range(n):
        kind = ("sum", "capital", "opposite", "plural")[i % 4]
        phrase = PHRASES[kind][rng.integers(len(PHRASES[kind]))]
        if kind == "sum":
            a, b = rng.integers(50, 100, 2) if held_out else rng.integers(1, 50, 2)
            pairs.append((phrase.format(a=a, b=b), str(a + b)))
        else:
            items = part({"capital": COUNTRIES, "opposite": OPPOSITES, "plural": PLURALS}[kind])
            x, y = items[rng.integers(len(items))]
            pairs.append((phrase.format(x=x), y))
    return pairs


def conversation(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": json.dumps({"answer": answer})}]}


def write_jsonl(path: Path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def compliant(text: str):
    """The answer's value when the whole text is {"answer": "<string>"}, else None."""
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return None
    if isinstance(value, dict) and list(value) == ["answer"] and isinstance(value["answer"], str):
        return value["answer"]
    return None


def minillm_answers(model_path, adapter, prompts) -> list[str]:
    from minillm.generate import Sampler, SamplingSettings, generate
    from minillm.runtime import RunConfig, load
    rt = load(RunConfig(model=str(model_path), lora=adapter, ctx_size=256, max_tokens=24,
                        sampling=SamplingSettings(temperature=0)), announce=lambda _: None)
    answers = []
    for question in prompts:
        ids = rt.tokenizer.encode_chat([{"role": "user", "content": question}])
        out = generate(rt.model, rt.new_cache(), ids, Sampler(rt.config.sampling), max_tokens=24,
                       stop_ids=rt.tokenizer.stop_ids)
        answers.append(rt.tokenizer.decode(list(out)))
    return answers


def llamacpp_answers(model_path, adapter, prompts) -> list[str] | None:
    try:
        from minillm.bench_llamacpp import import_llama_cpp
        llama_cpp = import_llama_cpp(repack=False)
    except Exception:  # llama-cpp-python is optional: the demo then measures minillm only
        return None
    llm = llama_cpp.Llama(model_path=str(model_path), lora_path=str(adapter), n_ctx=256, verbose=False, seed=0)
    return [llm.create_chat_completion([{"role": "user", "content": q}], max_tokens=24, temperature=0.0)
            ["choices"][0]["message"]["content"] for q in prompts]


def score(answers, expected) -> dict:
    values = [compliant(a) for a in answers]
    return {"compliant": float(np.mean([v is not None for v in values])),
            "correct": float(np.mean([v is not None and v.strip().lower() == e.lower() for v, e in zip(values, expected)]))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="SmolLM2's GGUF (default: the registry's, fetched on first use)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--train-size", type=int, default=320)
    parser.add_argument("--heldout-size", type=int, default=40)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    from minillm.registry import resolve_model
    from minillm.train.finetune import FinetuneConfig, finetune
    from minillm.train.loop import TrainSettings

    work = Path(args.workdir or tempfile.mkdtemp(prefix="lora-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    write_jsonl(work / "train.jsonl", [conversation(q, a) for q, a in questions(rng, False, args.train_size)])
    held = questions(np.random.default_rng(1), True, args.heldout_size)
    write_jsonl(work / "heldout.jsonl", [conversation(q, a) for q, a in held])
    model = resolve_model(args.model)
    start = time.perf_counter()
    report = finetune(FinetuneConfig(model=str(model), data=str(work / "train.jsonl"), output=str(work / "adapter.gguf"),
                                     eval_data=str(work / "heldout.jsonl"),
                                     train=TrainSettings(steps=args.steps, batch_size=8, lr=1e-3, warmup=4,
                                                         threads=os.cpu_count())), progress=True)
    report["train_seconds"] = time.perf_counter() - start
    prompts, expected = [q for q, _ in held], [a for _, a in held]
    results = {"before (minillm)": score(minillm_answers(model, None, prompts), expected)}
    after = minillm_answers(model, str(work / "adapter.gguf"), prompts)
    results["after (minillm --lora)"] = score(after, expected)
    theirs = llamacpp_answers(model, work / "adapter.gguf", prompts)
    if theirs is not None:
        results["after (llama.cpp lora_path)"] = score(theirs, expected)
    print(f"{len(prompts)} held-out questions; training {report['steps']} steps in {report['train_seconds']:.0f} s "
          f"({report['tokens_per_s']:.0f} tokens/s, peak RSS {report['peak_rss_mib']:.0f} MiB), "
          f"held-out answer loss {report['held_out_loss_before']:.3f} -> {report['held_out_loss_after']:.3f}")
    print("| model | compliant answers | correct answers |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['compliant']:.0%} | {r['correct']:.0%} |")
    for q, a in list(zip(prompts, after))[:4]:
        print(f"  {q!r} -> {a!r}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"report": report, "results": results}, indent=1))


if __name__ == "__main__":
    main()
