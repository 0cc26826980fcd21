"""verify-bundle cost on a 500-sample bundle: the code of one checkout against another's.

Builds (once, with this checkout) a bundle of N candidates gated by the test pipeline
(tests/bundle_helpers: 16^3 blobs, numpy projection encoder, NIfTI + DICOM), then times
``gate.publication.verify_bundle`` in a fresh process for each checkout given with --tree
(PYTHONPATH first; the first tree is the baseline). One run each; prints wall seconds and the
ratio to the baseline. The projection encoder is nearly free, so the ratio overstates what the
new checks add to a real run (where the ONNX encoder dominates).

    python bench/verify_bundle_cost.py --n 500 --work /tmp/vb --tree /tmp/old --tree .
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

TIMED = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tree!r})
from gate.policy import load_policy
from gate.index import TrainingIndex
from gate.publication import verify_bundle
from tests.index_helpers import ProjectionEncoder
work = Path({work!r})
enc = ProjectionEncoder(dim=16)
index = TrainingIndex.load(work / "index", enc)
policy = load_policy(str(work / "pol" / "release.yaml"))
t = time.perf_counter()
report = verify_bundle(work / "bundle", policy, index, enc, work / "audit.jsonl")
print(f"{{time.perf_counter() - t:.2f}} {{int(report.exit_code)}} {{len(report.samples)}}")
"""


def build(work: Path, n: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.bundle_helpers import candidate, make_training, release_policy_text, run_pipeline, write_policy

    training = make_training(work)
    policy = write_policy(work / "pol", "release", release_policy_text())
    cands = [(f"s-{i:04d}", 1000 + i, candidate(1000 + i)) for i in range(n)]
    run_pipeline(training, policy, work / "bundle", work / "audit.jsonl", cands, ("nifti", "dicom"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--tree", action="append", required=True)
    args = ap.parse_args()
    if not (args.work / "bundle").exists():
        t = time.perf_counter()
        build(args.work, args.n)
        print(f"built {args.work / 'bundle'} in {time.perf_counter() - t:.1f} s", flush=True)
    base = None
    for tree in args.tree:
        tree = str(Path(tree).resolve())
        code = TIMED.format(tree=tree, work=str(args.work))
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": tree, "PATH": ""}
        )
        if out.returncode != 0:
            print(f"{tree}: failed\n{out.stderr[-2000:]}")
            continue
        wall, exit_code, samples = out.stdout.split()[-3:]
        base = base or float(wall)
        print(
            f"{tree}: {wall} s, exit {exit_code}, {samples} samples, ratio {float(wall) / base:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
