"""--engine ray gives the same decisions, audit records and reports as --engine local; a killed
actor is retried or the run fails closed with exactly one audit record per candidate; the local
engine never imports Ray. One module-scoped local Ray (2 CPUs), the real encoder, real volumes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gate.audit import AuditLog, new_run_id, verify_log
from gate.cli import main
from gate.cli.check import _problem
from gate.embed import Encoder
from gate.engine import EngineConfig, judge, open_engine
from gate.errors import WorkerError
from gate.identity import Pseudonymizer
from gate.policy import load_policy
from gate.volume import ReadOptions
from tests.conftest import HIPPOCAMPUS_DIR

ray = pytest.importorskip("ray")

VOLATILE = {"run_id", "time", "hash", "prev_hash"}
"""Audit fields that differ between two runs by construction; every other field is compared."""


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """6 training volumes, an unsharded and a 2-shard index, 6 inputs (a copy, 4 others, junk)."""
    root = tmp_path_factory.mktemp("engine")
    files = sorted((HIPPOCAMPUS_DIR / "imagesTr").glob("*.nii.gz"))
    if len(files) < 10:
        pytest.skip("real data not found")
    train, cand = root / "train", root / "cand"
    train.mkdir()
    cand.mkdir()
    for f in files[:6]:
        (train / f.name).symlink_to(f)
    for f in files[6:10]:
        (cand / f.name).symlink_to(f)
    (cand / "copy.nii.gz").symlink_to(files[0])
    (cand / "junk.nii.gz").write_bytes(b"not a volume")
    env = {"GATE_ID_KEY_FILE": str(root / "key")}
    runner = CliRunner(env=env)
    for name, extra in (("single", []), ("sharded", ["--shards", "2"])):
        args = ["index", "build", "--data", str(train), "--out", str(root / name), "--poses", "none", *extra]
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    return {
        "root": root,
        "train": train,
        "cand": cand,
        "single": root / "single",
        "sharded": root / "sharded",
    }


def _check(
    data: dict[str, Path], index: str, engine: str, tag: str
) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    root = data["root"]
    log, report = root / f"{tag}.jsonl", root / f"{tag}.json"
    runner = CliRunner(env={"GATE_ID_KEY_FILE": str(root / "key"), "GATE_AUDIT_LOG": str(log)})
    args = [
        "check",
        str(data["cand"]),
        "--index",
        str(data[index]),
        "--json",
        str(report),
        "--engine",
        engine,
    ]
    result = runner.invoke(main, args)
    assert verify_log(log).ok
    records = [
        {k: v for k, v in json.loads(line).items() if k not in VOLATILE}
        for line in log.read_text().splitlines()
    ]
    return result.exit_code, json.loads(report.read_text()), records


def test_local_and_ray_give_the_same_decisions_records_and_reports(
    ray_local: None, data: dict[str, Path]
) -> None:
    code, report, records = _check(data, "single", "local", "local")
    assert code == 3  # junk is unreadable: fail closed
    assert report["summary"]["reject"] == 1  # the copy
    assert report["summary"]["unreadable"] == 2  # junk, and one outside the index's domain
    assert len(records) == 6 and [r["verdict"] for r in records[:2]] == ["error", "error"]
    for index in ("single", "sharded"):
        r_code, r_report, r_records = _check(data, index, "ray", f"ray-{index}")
        assert r_code == code
        if index == "single":  # same index: the JSON report and the records match byte for byte
            assert r_report == report
            assert r_records == records
        else:  # another index (its sha256 is shards.json's): everything else matches
            for key in ("results", "errors", "summary", "exit_code"):
                assert r_report[key] == report[key]
            assert [{k: v for k, v in r.items() if k != "index_sha256"} for r in r_records] == [
                {k: v for k, v in r.items() if k != "index_sha256"} for r in records
            ]


def test_ray_index_build_writes_the_same_shards(ray_local: None, data: dict[str, Path]) -> None:
    out = data["root"] / "ray-sharded"
    runner = CliRunner(env={"GATE_ID_KEY_FILE": str(data["root"] / "key")})
    args = [
        "index",
        "build",
        "--data",
        str(data["train"]),
        "--out",
        str(out),
        "--poses",
        "none",
        "--shards",
        "2",
    ]
    result = runner.invoke(main, [*args, "--engine", "ray"])
    assert result.exit_code == 0, result.output
    assert (out / "shards.json").read_bytes() == (data["sharded"] / "shards.json").read_bytes()


class KillingEngine:
    """Wraps a real engine: kills embedding actors after reading, before embedding (mid-run)."""

    def __init__(self, inner: Any, restart: bool, kill_all: bool) -> None:
        self._inner, self._restart, self._all = inner, restart, kill_all
        self.encoder, self.mapper = inner.encoder, inner.mapper

    @property
    def provider(self) -> str:
        return self._inner.provider

    def read(self, paths: Any, options: Any) -> Any:
        return self._inner.read(paths, options)

    def embed(self, items: Any) -> Any:
        actors = self._inner._pool()
        for actor in actors if self._all else actors[:1]:
            ray.kill(actor, no_restart=not self._restart)
        return self._inner.embed(items)

    def views(self, items: Any, verifier: Any) -> Any:
        return self._inner.views(items, verifier)


@pytest.mark.parametrize("restart", [True, False], ids=["retried", "fails-closed"])
def test_killed_actor_every_candidate_gets_exactly_one_record(
    ray_local: None, data: dict[str, Path], tmp_path: Path, restart: bool
) -> None:
    encoder = Encoder()
    policy = load_policy("strict")
    options = ReadOptions(pseudonymizer=Pseudonymizer(key=b"k" * 32))
    log = AuditLog(tmp_path / "audit.jsonl")
    with open_engine(EngineConfig("ray", workers=2, batch_size=2), encoder) as eng:
        index = eng.open_index(data["single"])
        killer = KillingEngine(eng, restart=restart, kill_all=not restart)
        if restart:
            judged = judge(killer, index, [data["cand"]], options, policy, log, new_run_id(), _problem)  # type: ignore[arg-type]
            assert [d.verdict.value for d in judged.decisions].count("reject") == 1
        else:
            with pytest.raises(WorkerError, match="retries ran out"):
                judge(killer, index, [data["cand"]], options, policy, log, new_run_id(), _problem)  # type: ignore[arg-type]
    records = list(log.records())
    assert verify_log(log.path).ok
    assert len(records) == 6  # 4 candidates + 2 refused inputs: none lost, none doubled
    assert len({r.candidate_sha256 for r in records if r.candidate_sha256}) == 4
    if not restart:
        assert all(r.verdict == "error" for r in records)
        assert sum("WorkerError" in (r.error or "") for r in records) == 4


def test_local_engine_imports_no_ray(data: dict[str, Path]) -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from gate.cli import main\n"
        f"r = CliRunner(env={{'GATE_ID_KEY_FILE': {str(data['root'] / 'key')!r}, "
        f"'GATE_AUDIT_LOG': {str(data['root'] / 'noray.jsonl')!r}}}).invoke(main, "
        f"['check', {str(data['cand'])!r}, '--index', {str(data['single'])!r}])\n"
        "assert r.exit_code == 3, r.output\n"
        "assert 'checked 4' in r.output, r.output\n"
        "print('ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr


def test_verify_bundle_on_ray_gives_the_same_report(ray_local: None, data: dict[str, Path]) -> None:
    from gate.index import TrainingIndex
    from gate.volume import read_volumes
    from tests.bundle_helpers import Training, run_pipeline

    root, encoder = data["root"], Encoder()
    opts = ReadOptions(pseudonymizer=Pseudonymizer(key=b"k" * 32))
    cands = [
        (f"s{i:06d}", i, read_volumes(p, opts)[0]) for i, p in enumerate(sorted(data["cand"].glob("hipp*")))
    ]
    training = Training(
        data["train"], data["single"], encoder, TrainingIndex.load(data["single"], encoder), [], []
    )  # type: ignore[arg-type]
    log = root / "bundle-audit.jsonl"
    bundle, _ = run_pipeline(training, load_policy("strict"), root / "bundles", log, cands)
    runner = CliRunner(env={"GATE_ID_KEY_FILE": str(root / "key")})
    reports = []
    for engine, index in (("local", "single"), ("ray", "single")):
        out = root / f"vb-{engine}-{index}.json"
        args = ["verify-bundle", str(bundle), "--index", str(data[index]), "--audit-log", str(log)]
        result = runner.invoke(main, [*args, "--json", str(out), "--engine", engine])
        assert result.exit_code == 3, result.output  # one sample lies outside the index's domain
        reports.append(json.loads(out.read_text()))
    assert reports[0] == reports[1]  # every check, sample verdict and similarity


def test_ray_judges_chunk_after_chunk_with_every_cpu_held_by_actors(
    ray_local: None, data: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 embedding actors hold both CPUs of the local Ray; the reads of chunk 2 must still run."""
    import threading

    import gate.engine

    code, report, records = _check(data, "single", "local", "local-chunks")
    monkeypatch.setattr(gate.engine, "JUDGE_CHUNK", 2)
    done: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: done.update(out=_check(data, "single", "ray", "ray-chunks")), daemon=True
    )
    worker.start()
    worker.join(timeout=240)
    assert not worker.is_alive(), "gate check --engine ray hung on its second chunk"
    r_code, r_report, r_records = done["out"]
    assert (r_code, r_report["summary"]) == (code, report["summary"])

    def by_source(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return sorted(rows, key=lambda r: r["source"])

    assert by_source(r_report["errors"]) == by_source(report["errors"])  # recorded per chunk
    # other batch compositions: onnxruntime's sums may differ in the last bits, nothing else
    keys = ("source", "verdict", "grade", "nearest_patient_id", "exact_duplicate")
    assert [[r[k] for k in keys] for r in r_report["results"]] == [
        [r[k] for k in keys] for r in report["results"]
    ]
    for mine, theirs in zip(r_report["results"], report["results"], strict=True):
        assert mine["similarity"] == pytest.approx(theirs["similarity"], abs=1e-6)
    assert sorted((r["verdict"], r.get("nearest_patient_id") or "") for r in r_records) == sorted(
        (r["verdict"], r.get("nearest_patient_id") or "") for r in records
    )
