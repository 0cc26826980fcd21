"""Ray engine stages alone: read (+ domain check, preprocess, hash) and embed, one chunk at a time.

Times ``RayEngine.read`` and ``RayEngine.embed`` on :data:`gate.engine.JUDGE_CHUNK` candidates per
repeat (a different slice each repeat, the same slices in every run), with the shipped encoder and
index, so two versions of the engine can be compared in alternating runs on a shared CPU (whole
``gate check`` runs take minutes each, and the load of other jobs drifts between them). The
engine's interface is the same across versions, so an older tree runs this file too::

    .venv/bin/python bench/ray_stage_bench.py --tag new
    git worktree add /tmp/old COMMIT && (cd /tmp/old && PYTHONPATH=/tmp/old \\
        /work/main/.venv/bin/python /work/main/bench/ray_stage_bench.py --tag old)

Candidates: the files ``bench/ray_bench.py`` writes (``runs/ray_bench_10000``). One JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    """Open a local Ray engine, time read and embed per chunk, print one JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cands", type=Path, default=ROOT / "runs" / "ray_bench_10000")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "ray_stage_bench.jsonl")
    args = ap.parse_args()

    import gate
    from gate.embed import Encoder
    from gate.engine import JUDGE_CHUNK, EngineConfig, open_engine
    from gate.identity import Pseudonymizer
    from gate.index import DEFAULT_INDEX_DIR
    from gate.volume import ReadOptions

    sources = sorted(args.cands.glob("*.nii.gz"))
    if len(sources) < args.repeats * JUDGE_CHUNK:
        raise SystemExit(
            f"need {args.repeats * JUDGE_CHUNK} candidates in {args.cands}; run bench/ray_bench.py"
        )
    options = ReadOptions(pseudonymizer=Pseudonymizer(key=b"k" * 32))
    t0 = time.perf_counter()
    with open_engine(EngineConfig("ray", workers=args.workers), Encoder()) as eng:
        eng.open_index(DEFAULT_INDEX_DIR)
        _ = eng.provider  # start the embedding actors before timing
        start_s = time.perf_counter() - t0
        reads, embeds = [], []
        for r in range(args.repeats):
            chunk = sources[r * JUDGE_CHUNK : (r + 1) * JUDGE_CHUNK]
            t = time.perf_counter()
            items, errors = eng.read(chunk, options)
            reads.append(time.perf_counter() - t)
            t = time.perf_counter()
            probes = eng.embed(items)
            embeds.append(time.perf_counter() - t)
            if errors or len(probes) != len(chunk):
                raise SystemExit(f"chunk {r}: {len(errors)} errors, {len(probes)} probes of {len(chunk)}")
    row = {
        "tag": args.tag,
        "gate": str(Path(gate.__file__).parent),
        "chunk": JUDGE_CHUNK,
        "workers": args.workers,
        "startup_s": round(start_s, 1),
        "read_s": [round(x, 2) for x in reads],
        "embed_s": [round(x, 2) for x in embeds],
        "read_median_s": round(statistics.median(reads), 2),
        "embed_median_s": round(statistics.median(embeds), 2),
        "load1": os.getloadavg()[0],
    }
    print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
