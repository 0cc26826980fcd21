"""Hostile inputs on the CLI: wall time and peak RSS of each refusal (``/usr/bin/time -v``).

Builds each input in a scratch folder, runs ``gate check INPUT`` (shipped index and encoder,
so the figures include gate's start-up: importing onnxruntime, loading the index) and, for the
policy bomb, ``gate check --policy bomb.yaml``; prints one markdown row per input with exit
code, the one stderr line, elapsed seconds and maximum resident set size. Also prints the
start-up baseline (a good 16^3 NIfTI) so the refusals can be read against it.

    python bench/bounded_readers.py [--scratch DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.volumes import (
    YAML_BOMB,
    make_blob,
    nifti_header_bytes,
    write_gzip_bomb,
    write_huge_npy,
    write_nifti,
)

GATE = Path(sys.executable).with_name("gate")


def build(scratch: Path) -> list[tuple[str, list[str]]]:
    """(label, gate arguments) per case; files written under ``scratch``."""
    good = write_nifti(scratch / "good.nii.gz", make_blob())
    bomb_yaml = scratch / "bomb.yaml"
    bomb_yaml.write_text(YAML_BOMB)
    gz = write_gzip_bomb(scratch / "bomb.nii.gz", (2200, 2200, 2200), 10 * 10**9)
    huge_nii = scratch / "huge.nii"
    huge_nii.write_bytes(nifti_header_bytes((10000, 10000, 10000)))
    huge_npy = write_huge_npy(scratch / "huge.npy", (10000, 10000, 10000))
    member = write_huge_npy(scratch / "m.npy", (5000, 5000, 5000))
    npz = scratch / "bomb.npz"
    with zipfile.ZipFile(npz, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(member, "x.npy")
    loop = scratch / "loop.nii.gz"
    loop.unlink(missing_ok=True)
    loop.symlink_to(loop)
    tree = scratch / "tree"
    (tree / "sub").mkdir(parents=True, exist_ok=True)
    write_nifti(tree / "sub" / "a.nii.gz", make_blob())
    back = tree / "sub" / "back"
    back.unlink(missing_ok=True)
    back.symlink_to(tree)
    fifo = scratch / "pipe.nii"
    if not fifo.exists():
        os.mkfifo(fifo)
    return [
        ("good 16^3 NIfTI (start-up baseline)", ["check", str(good), "--allow-flag"]),
        (
            f"YAML alias bomb as --policy ({len(YAML_BOMB)} B)",
            ["check", str(good), "--policy", str(bomb_yaml)],
        ),
        (
            f".nii.gz bomb: {gz.stat().st_size / 1e6:.1f} MB inflating to 10 GB, header 2200^3",
            ["check", str(gz)],
        ),
        ("NIfTI header claiming 10000^3", ["check", str(huge_nii)]),
        (".npy header claiming 10000^3", ["check", str(huge_npy)]),
        (".npz member claiming 5000^3", ["check", str(npz)]),
        ("symlink loop (file)", ["check", str(loop)]),
        ("folder loop (symlink to an ancestor)", ["check", str(tree)]),
        ("FIFO named .nii", ["check", str(fifo)]),
    ]


def measure(args: list[str], env: dict[str, str]) -> tuple[int, str, float, float]:
    """Exit code, last stderr line, elapsed s, max RSS MB of ``gate ARGS``."""
    proc = subprocess.run(
        ["/usr/bin/time", "-v", str(GATE), *args], capture_output=True, text=True, env=env, timeout=600
    )
    lines = proc.stderr.splitlines()
    timing = lines.index(next(ln for ln in lines if "Command being timed" in ln))
    message = next((ln for ln in reversed(lines[:timing]) if ln.startswith("gate:")), "")
    stats = "\n".join(lines[timing:])
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", stats)
    assert wall is not None
    seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stats).group(1)) / 1024  # type: ignore[union-attr]
    rows = [ln.split(None, 6)[-1] for ln in proc.stdout.splitlines() if ln.startswith("ERROR")]
    return proc.returncode, rows[0] if rows else message, seconds, rss


READER = (
    "import sys; from pathlib import Path; from gate.errors import GateError; "
    "from gate.identity import Pseudonymizer; from gate.policy import load_policy; "
    "from gate.volume import ReadOptions, discover, read_volumes\n"
    "p = sys.argv[1]\n"
    "try:\n"
    "    if p.endswith('.yaml'): load_policy(p)\n"
    "    else: [read_volumes(s, ReadOptions(Pseudonymizer(key=bytes(32)))) for s in discover([Path(p)])]\n"
    "except GateError as e: sys.exit(int(e.exit_code))"
)


def measure_reader(target: str) -> tuple[int, float, float]:
    """Exit code, elapsed s, max RSS MB of the reader alone (no encoder, no index) in a fresh Python."""
    proc = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-c", READER, target],
        capture_output=True,
        text=True,
        timeout=600,
    )
    stats = proc.stderr
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", stats)
    assert wall is not None
    seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stats).group(1)) / 1024  # type: ignore[union-attr]
    return proc.returncode, seconds, rss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scratch", type=Path, default=None)
    opts = parser.parse_args()
    scratch = opts.scratch or Path(tempfile.mkdtemp(prefix="gate-bounded-"))
    scratch.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, GATE_AUDIT_LOG=str(scratch / "audit.jsonl"), GATE_ID_KEY_FILE=str(scratch / "key"))
    print("| input | `gate check` exit | wall s | peak RSS MB | reader alone: exit, wall s, peak MB | line |")
    print("|---|---|---|---|---|---|")
    for label, args in build(scratch):
        code, line, wall, rss = measure(args, env)
        target = args[args.index("--policy") + 1] if "--policy" in args else args[1]
        r_code, r_wall, r_rss = measure_reader(target)
        line = line.replace(str(scratch) + "/", "").replace("|", "\\|")[:150]
        print(
            f"| {label} | {code} | {wall:.2f} | {rss:.0f} | {r_code}, {r_wall:.2f}, {r_rss:.0f} | `{line}` |",
            flush=True,
        )


if __name__ == "__main__":
    main()
