"""Fuzzing in the suite: every structured mutation of the micro model (tests/hostile.py: each key
minillm reads given a value of every type, removed and repeated; every field of every tensor entry
and NaN in the data; the hostile chat templates; every header field overwritten with edge values,
and the file cut at each, the fields of two items of each array), run through the command line by
two child processes whose address space is capped, each file within a time limit
(tests/fuzz_gguf.py). Only minillm's own one-line errors may come out: no traceback, no hang, no
crash, no allocation past the cap. `python tests/fuzz_gguf.py` runs the larger random campaign.
"""

import time

from fuzz_gguf import FILE_SECONDS, run_in_parallel, write_files
from hostile import RawGGUF, micro_model, mutations

from minillm.template import MAX_WORK


def test_structured_mutations_end_in_minillm_errors_only(tmp_path):
    base = RawGGUF.read(micro_model(tmp_path / "micro.gguf.valid"))
    n_files = write_files(tmp_path, mutations(base, items_per_array=2))
    start = time.perf_counter()
    campaign = run_in_parallel(tmp_path, jobs=2)
    seconds = time.perf_counter() - start
    assert len(campaign.records) == n_files
    bad = [r for r in campaign.records if r["outcome"] not in ("ran", "refused")]
    assert not bad, bad[:3]
    for record in campaign.records:
        if record["outcome"] == "refused":
            assert record["error"] and record["error"][0].startswith("minillm: error: "), record
        assert record["seconds"] < FILE_SECONDS
        # the micro model and a 2048-position KV cache take a few MiB; a chat template at most
        # MAX_WORK characters (up to 4 bytes each)
        assert record["peak_bytes"] < 8 << 20 or "--raw" not in record["command"] and \
            record["peak_bytes"] < 4 * MAX_WORK, record
    assert campaign.count("ran") > 100 and campaign.count("refused") > 1000
    print(f"{n_files} files in {seconds:.1f} s: {campaign.summary()}")
