"""Fuzz minillm with mutated GGUF files, in child processes that cannot hide a crash, a hang or a
runaway allocation.

    python tests/fuzz_gguf.py [--files 10000] [--seed 0]

The files are tests/hostile.py's mutations of the micro model (a random structured mutation, then
up to three random bytes of its header changed). Each batch of files runs in a child process
(`--child DIR`) that first runs the valid model through every command (so imports and JIT
compilation are done), then caps its address space at what it holds plus ADDRESS_SPACE_MARGIN
(RLIMIT_AS: an allocation past that fails at once instead of growing) and runs every file through
minillm's command line in-process, the commands taking turns (hostile.command; every
MEM_CAP_EVERY-th file under --mem-cap instead). For each file it prints one JSON line: the outcome
("ran": exit 0, "refused": a one-line error, "escaped": any other exception, with its traceback),
the seconds it took and the peak resident memory above the process before the file. The parent
gives each file FILE_SECONDS: a child that prints nothing for that long is killed and its file
counted as a hang; a child that dies counts its file as a crash; either way a new child carries on
with the next file.
"""

import argparse
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ADDRESS_SPACE_MARGIN = 1 << 30
FILE_SECONDS = 20.0
MEM_CAP_EVERY = 50


# --- the child: run files, one JSON line each ---------------------------------------------------

def run_child(directory: Path, names: list):
    import resource

    import hostile
    from minillm.memory import reset_peak, usage
    warm_up(directory)
    with open("/proc/self/statm") as f:
        cap = int(f.read().split()[0]) * resource.getpagesize() + ADDRESS_SPACE_MARGIN
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    descriptions = json.loads((directory / "index.json").read_text())
    for name in names:
        path, n = directory / name, int(name.split(".")[0])
        argv = hostile.command(path, n, chat=descriptions[n].startswith("template"))
        if n % MEM_CAP_EVERY == MEM_CAP_EVERY - 1:
            argv = ["generate", "-m", path, "hi", "-n", "2", "-t", "1", "--mem-cap", "64MiB"]
        reset_peak()  # the high-water mark restarts at the resident memory now (no gc: it costs 50 ms)
        before, start = usage().rss, time.perf_counter()
        record = {"file": path.name, "command": " ".join(map(str, argv[:1] + argv[3:]))}
        try:
            code, stderr = hostile.run_cli(argv)
            record.update(outcome="ran" if code == 0 else "refused", error=stderr.strip().splitlines()[-1:])
        except BaseException as e:  # what the fuzzer looks for: anything but minillm's own errors
            record.update(outcome="escaped", error=traceback.format_exception_only(e)[-1].strip(),
                          traceback=traceback.format_exc(limit=-8))
        record.update(seconds=time.perf_counter() - start, peak_bytes=usage().peak - before,
                      file_bytes=path.stat().st_size)
        print(json.dumps(record), flush=True)


def warm_up(directory: Path):
    """The valid micro model through every command once, before the address space is capped."""
    import hostile
    path = hostile.micro_model(directory / "warm-up.gguf.valid")
    for n in range(6):
        hostile.run_cli(hostile.command(path, n))
    hostile.run_cli(["generate", "-m", path, "hi", "-n", "2", "-t", "1", "--mem-cap", "64MiB"])


# --- the parent: write files, run children, collect ----------------------------------------------

@dataclass
class Campaign:
    records: list = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(r["outcome"] == outcome for r in self.records)

    def summary(self) -> dict:
        measured = [r for r in self.records if "seconds" in r]
        worst_time = max(measured, key=lambda r: r["seconds"])
        worst_memory = max(measured, key=lambda r: r["peak_bytes"])
        return {
            "files": len(self.records), **{o: self.count(o) for o in ("ran", "refused", "escaped", "hung", "crashed")},
            "worst_seconds": round(worst_time["seconds"], 2), "worst_seconds_file": worst_time["command"],
            "worst_peak_mib": round(worst_memory["peak_bytes"] / 2**20, 1),
            "worst_peak_file_bytes": worst_memory["file_bytes"], "worst_peak_command": worst_memory["command"],
        }


def run_files(directory: Path, names: list, on_record=lambda r: None) -> list:
    """Run the files `names` in `directory` through children, one after the other, replacing a
    child that hangs or dies; the records, in order."""
    records = []
    while len(records) < len(names):
        todo = names[len(records):]
        errors = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty child cannot block on it
        child = subprocess.Popen([sys.executable, __file__, "--child", str(directory), *todo],
                                 stdout=subprocess.PIPE, stderr=errors, text=True, cwd=HERE.parent,
                                 env={**os.environ, "MALLOC_ARENA_MAX": "2"})
        wait = FILE_SECONDS + 120  # the first file waits for the child's start and warm-up too
        for name in todo:
            ready, _, _ = select.select([child.stdout], [], [], wait)
            line = child.stdout.readline() if ready else None
            if not line:  # nothing within the time (a hang), or the end of the output (a crash)
                if line is None:
                    child.kill()
                child.wait()
                errors.seek(0)
                records.append({"file": name, "outcome": "hung" if line is None else "crashed",
                                "returncode": child.returncode, "stderr": errors.read()[-2000:]})
                on_record(records[-1])
                break
            records.append(json.loads(line))
            on_record(records[-1])
            wait = FILE_SECONDS
        child.stdout.close()
        child.wait()
    return records


def run_in_parallel(directory: Path, jobs: int, on_record=lambda r: None) -> Campaign:
    """All files of `directory` in `jobs` shards, each run by its own child at the same time."""
    names = sorted(path.name for path in directory.glob("*.gguf"))
    lock = threading.Lock()

    def report(record):
        with lock:
            on_record(record)
    with ThreadPoolExecutor(jobs) as pool:
        shards = pool.map(lambda k: run_files(directory, names[k::jobs], report), range(jobs))
        return Campaign([record for shard in shards for record in shard])


def write_files(directory: Path, mutated) -> int:
    """Write (description, bytes) pairs as NNNNNN.gguf, with an index of descriptions; their number."""
    index = []
    for n, (description, raw) in enumerate(mutated):
        (directory / f"{n:06d}.gguf").write_bytes(raw)
        index.append(description)
    (directory / "index.json").write_text(json.dumps(index, indent=0))
    return len(index)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="children running at once (default: 2)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("names", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=Path, default=None, help="write the files and results here (default: a temporary directory)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    if args.child:
        return run_child(args.child, args.names)
    import itertools

    import numpy as np

    import hostile
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.keep or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        base = hostile.RawGGUF.read(hostile.micro_model(Path(tmp) / "micro.gguf.valid"))
        mutated = itertools.islice(hostile.random_mutations(base, np.random.default_rng(args.seed)), args.files)
        write_files(directory, mutated)
        start = time.perf_counter()
        progress = {"n": 0}

        def report(record):
            progress["n"] += 1
            if record["outcome"] in ("escaped", "hung", "crashed"):
                print(json.dumps(record), file=sys.stderr, flush=True)
            if progress["n"] % 500 == 0:
                print(f"{progress['n']} files, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        campaign = run_in_parallel(directory, args.jobs, report)
        summary = {**campaign.summary(), "total_seconds": round(time.perf_counter() - start, 1)}
        if args.keep:
            (directory / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in campaign.records))
        print(json.dumps(summary, indent=1))
        return 0 if not any(summary[o] for o in ("escaped", "hung", "crashed")) else 1


if __name__ == "__main__":
    sys.exit(main())
