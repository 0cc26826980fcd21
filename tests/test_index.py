from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import gate.index
import gate.index as gindex
from gate.calibration import (
    MIN_CALIBRATION_PATIENTS,
    CalibrationMethod,
    holdout,
    leave_one_patient_out,
)
from gate.errors import IntegrityError, UsageError
from gate.index import (
    INDEX_FILE,
    MANIFEST_FILE,
    VECTORS_FILE,
    Probe,
    TrainingIndex,
    build_index,
    embed_volumes,
)
from gate.poses import DEFAULT_POSES, IDENTITY_ONLY, Pose, PoseSet, apply_pose
from gate.preprocess import preprocess
from gate.values import Embedding, Volume
from tests.index_helpers import ProjectionEncoder, build_from_vectors, pid, unit_rows
from tests.volumes import make_blob

DIM = 16


@pytest.fixture
def encoder() -> ProjectionEncoder:
    return ProjectionEncoder(dim=DIM)


@pytest.fixture
def vectors() -> np.ndarray:
    return unit_rows(600, DIM, seed=1)


@pytest.fixture
def index_dir(tmp_path: Path, vectors: np.ndarray, encoder: ProjectionEncoder) -> Path:
    out = tmp_path / "idx"
    build_from_vectors(vectors, out, encoder, per_patient=2)
    return out


def exact_neighbours(vectors: np.ndarray, ids: list[str], q: np.ndarray) -> tuple[str, float]:
    sims = vectors.astype(np.float64) @ q.astype(np.float64)
    best = int(np.argmax(sims))
    return ids[best], float(sims[best])


def test_hnsw_matches_exact_search(index_dir: Path, vectors: np.ndarray, encoder: ProjectionEncoder) -> None:
    index = TrainingIndex.load(index_dir, encoder)
    ids = [r.patient_id for r in index.manifest.rows]
    queries = np.concatenate(
        [unit_rows(100, DIM, seed=9), gindex._planted_copies(vectors, np.arange(100), 0.9, 3)]
    )
    found = index.search_many([Embedding(q, encoder.sha256) for q in queries], [None] * len(queries), k=3)
    for q, n in zip(queries, found, strict=True):
        want_id, want_sim = exact_neighbours(vectors, ids, q)
        assert n.nearest_id == want_id
        assert n.nearest_similarity == pytest.approx(want_sim, abs=1e-6)
        assert len(set(n.patient_ids)) == len(n.patient_ids) <= 3


def test_save_load_same_answers(index_dir: Path, encoder: ProjectionEncoder) -> None:
    a = TrainingIndex.load(index_dir, encoder)
    copy = index_dir.parent / "copy"
    shutil.copytree(index_dir, copy)
    b = TrainingIndex.load(copy, encoder)
    assert a.manifest.ef == b.manifest.ef == gindex.EF_SEARCH
    for q in unit_rows(50, DIM, seed=4):
        na, nb = a.search(Embedding(q, encoder.sha256)), b.search(Embedding(q, encoder.sha256))
        assert na.patient_ids == nb.patient_ids
        np.testing.assert_array_equal(na.similarities, nb.similarities)


def test_build_is_reproducible(tmp_path: Path, vectors: np.ndarray, encoder: ProjectionEncoder) -> None:
    build_from_vectors(vectors, tmp_path / "a", encoder)
    build_from_vectors(vectors, tmp_path / "b", encoder)
    assert (tmp_path / "a" / MANIFEST_FILE).read_bytes() == (tmp_path / "b" / MANIFEST_FILE).read_bytes()


def test_patient_aggregation_is_max(tmp_path: Path, encoder: ProjectionEncoder) -> None:
    base = unit_rows(40, DIM, seed=2)
    build_from_vectors(base, tmp_path / "idx", encoder, per_patient=4)  # 10 patients x 4 volumes
    index = TrainingIndex.load(tmp_path / "idx", encoder)
    n = index.search(Embedding(base[5], encoder.sha256), k=10)
    assert n.nearest_id == pid(1) and n.nearest_similarity == pytest.approx(1.0, abs=1e-6)
    assert len(n.patient_ids) == len(set(n.patient_ids))
    sims = base.astype(np.float64) @ base[5].astype(np.float64)
    expected = sorted((sims[4 * p : 4 * p + 4].max() for p in range(10)), reverse=True)
    np.testing.assert_allclose(n.similarities, expected[: len(n.similarities)], atol=1e-6)


def test_exact_duplicate_by_voxel_hash(
    index_dir: Path, vectors: np.ndarray, encoder: ProjectionEncoder
) -> None:
    index = TrainingIndex.load(index_dir, encoder)
    other = Embedding(unit_rows(1, DIM, seed=11)[0], encoder.sha256)
    assert index.search(other, voxel_sha256=f"{7:064x}").exact_duplicate
    assert not index.search(other, voxel_sha256="f" * 64).exact_duplicate
    assert not index.search(other).exact_duplicate


def test_manifest_contents_and_no_paths(index_dir: Path, tmp_path: Path) -> None:
    text = (index_dir / MANIFEST_FILE).read_text()
    manifest = json.loads(text)
    for key in (
        "space",
        "dim",
        "M",
        "ef_construction",
        "ef",
        "count",
        "seed",
        "encoder_sha256",
        "preprocess_digest",
        "index_sha256",
        "calibration",
        "self_test",
    ):
        assert key in manifest
    assert manifest["self_test"]["recall_at_1"] == 1.0 and manifest["self_test"]["passed"]
    assert manifest["count"] == 600 and manifest["n_patients"] == 300
    assert str(tmp_path) not in text and "row1" not in text


def test_refuses_wrong_encoder_digest(index_dir: Path) -> None:
    other = ProjectionEncoder(dim=DIM, seed=5)
    with pytest.raises(
        IntegrityError, match=r"idx: built with encoder 0010eeeeeeee…, but the encoder in use is 0510ee"
    ):
        TrainingIndex.load(index_dir, other)


def test_refuses_wrong_dimension(index_dir: Path, encoder: ProjectionEncoder) -> None:
    wrong = ProjectionEncoder(dim=8)
    wrong.sha256 = encoder.sha256
    with pytest.raises(IntegrityError, match=r"idx: dimension 16, but the encoder makes 8-d embeddings"):
        TrainingIndex.load(index_dir, wrong)


def test_refuses_wrong_preprocessing(index_dir: Path, encoder: ProjectionEncoder) -> None:
    wrong = ProjectionEncoder(dim=DIM, grid=(8, 8, 16))
    with pytest.raises(
        IntegrityError, match=r"idx: preprocessing digest [0-9a-f]{12}… differs from the encoder's"
    ):
        TrainingIndex.load(index_dir, wrong)


def test_refuses_modified_index_file(index_dir: Path, encoder: ProjectionEncoder) -> None:
    path = index_dir / INDEX_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(
        IntegrityError, match=r"index.bin: sha256 [0-9a-f]{12}… does not match the manifest's"
    ):
        TrainingIndex.load(index_dir, encoder)


def test_refuses_modified_vectors(index_dir: Path, encoder: ProjectionEncoder) -> None:
    np.save(index_dir / VECTORS_FILE, unit_rows(600, DIM, seed=3), allow_pickle=False)
    with pytest.raises(IntegrityError, match=r"vectors.npy: sha256 .* does not match the manifest's"):
        TrainingIndex.load(index_dir, encoder)


def _edit_manifest(index_dir: Path, **changes: object) -> None:
    path = index_dir / MANIFEST_FILE
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            data[outer][inner] = value
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_refuses_failed_self_test(index_dir: Path, encoder: ProjectionEncoder) -> None:
    _edit_manifest(index_dir, **{"self_test.recall_at_1": 0.99, "self_test.passed": False})
    with pytest.raises(IntegrityError, match=r"build self-test recall@1 0.9900 < 1.0; refusing an index"):
        TrainingIndex.load(index_dir, encoder)


def test_refuses_manifest_dimension_edit(index_dir: Path) -> None:
    _edit_manifest(index_dir, dim=8)
    wrong = ProjectionEncoder(dim=8)
    wrong.sha256 = ProjectionEncoder(dim=DIM).sha256
    wrong.preprocess = ProjectionEncoder(dim=DIM).preprocess
    with pytest.raises(
        IntegrityError, match=r"vectors.npy: float32 \(600, 16\); expected float32 \(600, 8\)"
    ):
        TrainingIndex.load(index_dir, wrong)


def test_refuses_missing_or_foreign_manifest(
    tmp_path: Path, index_dir: Path, encoder: ProjectionEncoder
) -> None:
    with pytest.raises(IntegrityError, match=r"manifest.json: not found; expected an index folder"):
        TrainingIndex.load(tmp_path / "nowhere", encoder)
    _edit_manifest(index_dir, format_version=99)
    with pytest.raises(IntegrityError, match=r"format_version 99; this gate reads 5; rebuild it"):
        TrainingIndex.load(index_dir, encoder)


def test_graph_disagreeing_with_vectors_is_refused(tmp_path: Path, encoder: ProjectionEncoder) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    build_from_vectors(unit_rows(100, DIM, seed=1), a, encoder)
    build_from_vectors(unit_rows(100, DIM, seed=2), b, encoder)
    shutil.copy(b / INDEX_FILE, a / INDEX_FILE)  # graph of other vectors, manifest hash fixed up
    _edit_manifest(a, index_sha256=json.loads((b / MANIFEST_FILE).read_text())["index_sha256"])
    with pytest.raises(IntegrityError, match=r"index.bin: the graph's vectors differ from vectors.npy"):
        TrainingIndex.load(a, encoder)


def test_non_finite_distance_is_an_error(index_dir: Path, encoder: ProjectionEncoder) -> None:
    index = TrainingIndex.load(index_dir, encoder)

    class NanGraph:
        def knn_query(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            return np.zeros((len(q), k), dtype=np.uint64), np.full((len(q), k), np.nan, dtype=np.float32)

    index._graph = NanGraph()
    with pytest.raises(IntegrityError, match=r"the index returned non-finite distances"):
        index.search(Embedding(unit_rows(1, DIM)[0], encoder.sha256))


def test_search_refuses_other_encoder_embedding(index_dir: Path, encoder: ProjectionEncoder) -> None:
    index = TrainingIndex.load(index_dir, encoder)
    with pytest.raises(
        IntegrityError, match=r"q: embedded by encoder ffffffffffff…, but the index was built with"
    ):
        index.search(Embedding(unit_rows(1, DIM)[0], "f" * 64, source="q"))


def test_self_test_failure_refuses_build(
    tmp_path: Path, vectors: np.ndarray, encoder: ProjectionEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = gindex._top_rows

    def lossy(graph, vecs, queries, candidates):  # drop the best candidate: a simulated ANN miss
        labels, sims = real(graph, vecs, queries, candidates)
        worst = sims.argmin(axis=1)
        return labels[np.arange(len(labels)), worst][:, None], sims[np.arange(len(sims)), worst][:, None]

    monkeypatch.setattr(gindex, "_top_rows", lossy)
    with pytest.raises(
        IntegrityError, match=r"index self-test failed: recall@1 0.0000 < 1.0 on planted near-copies"
    ):
        build_from_vectors(vectors, tmp_path / "idx", encoder)
    assert not (tmp_path / "idx").exists()


def test_build_refuses_existing_dir_and_clear_ids(tmp_path: Path, encoder: ProjectionEncoder) -> None:
    v = unit_rows(10, DIM)
    probes = [Probe(Embedding(x, encoder.sha256), "a" * 64) for x in v]
    cal = leave_one_patient_out(v, [pid(i) for i in range(10)], 0)
    (tmp_path / "exists").mkdir()
    with pytest.raises(UsageError, match=r"exists: already exists; choose a new --out folder"):
        build_index(probes, [pid(i) for i in range(10)], ["a" * 64] * 10, encoder, tmp_path / "exists", cal)
    ids = [pid(i) for i in range(9)] + ["hippocampus_001"]
    with pytest.raises(UsageError, match=r"patient id 'hippocampus_001' is not a gate pseudonym"):
        build_index(probes, ids, ["a" * 64] * 10, encoder, tmp_path / "new", cal)


def test_embed_volumes_hashes_preprocessed_grid(
    encoder: ProjectionEncoder, read_opts, tmp_path: Path
) -> None:
    from gate.digest import sha256_voxels
    from gate.preprocess import preprocess
    from gate.volume import read_volumes
    from tests.volumes import make_blob, write_nifti

    vol = read_volumes(write_nifti(tmp_path / "a.nii.gz", make_blob()), read_opts)[0]
    (probe,) = embed_volumes([vol], encoder)
    assert probe.voxel_sha256 == sha256_voxels(preprocess(vol, encoder.preprocess).data)
    assert probe.embedding.encoder_sha256 == encoder.sha256 and probe.embedding.dim == DIM


def test_leave_one_patient_out_calibration() -> None:
    v = unit_rows(3, DIM, seed=0)
    rows = np.stack([v[0], v[0], v[1], v[2]])  # patient 0 has two identical volumes
    cal = leave_one_patient_out(rows, [pid(0), pid(0), pid(1), pid(2)], seed=0)
    sims = v.astype(np.float64) @ v.T.astype(np.float64)
    want = sorted(max(sims[i, j] for j in range(3) if j != i) for i in range(3))
    assert cal.method is CalibrationMethod.LEAVE_ONE_PATIENT_OUT and cal.n_patients == 3
    np.testing.assert_allclose(cal.similarities, want, atol=1e-6)
    with pytest.raises(
        UsageError,
        match=rf"calibration holds 3 patient\(s\); percentile thresholds need at least "
        rf"{MIN_CALIBRATION_PATIENTS}",
    ):
        cal.percentile(50)


def test_holdout_calibration_refuses_overlap() -> None:
    v = unit_rows(6, DIM)
    cal = holdout(v[:2], [pid(10), pid(11)], v[2:], [pid(i) for i in range(4)])
    assert cal.method is CalibrationMethod.HOLDOUT and cal.n_patients == 2
    with pytest.raises(UsageError, match=r"1 holdout patient\(s\) also occur in the training data"):
        holdout(v[:2], [pid(0), pid(11)], v[2:], [pid(i) for i in range(4)])


# ---------------------------------------------------------------- poses


def _posed_world(tmp_path: Path, poses: PoseSet) -> tuple[TrainingIndex, ProjectionEncoder, list[Volume]]:
    """An index of 8 blob volumes (12^3 grid) under ``poses``, with LOPO calibration on as-read rows."""
    enc = ProjectionEncoder(dim=32, grid=(12, 12, 12))
    vols = [
        Volume(make_blob((12, 12, 12), seed=i), np.eye(4), (1.0, 1.0, 1.0), f"v{i}", pid(i)) for i in range(8)
    ]
    probes = embed_volumes(vols, enc, poses)
    assert len(probes) == len(vols) * len(poses)
    vecs = np.stack([p.embedding.vector for p in probes])
    row_ids = [v.patient_id for v in vols for _ in range(len(poses))]
    cal = leave_one_patient_out(vecs, row_ids, 0, query_rows=np.arange(0, len(vecs), len(poses)))
    out = tmp_path / f"idx-{len(poses)}"
    build_index(probes, [v.patient_id for v in vols], ["ab" * 32] * len(vols), enc, out, cal, poses=poses)
    return TrainingIndex.load(out, enc), enc, vols


def test_posed_index_finds_shifted_copies(tmp_path: Path) -> None:
    posed, enc, vols = _posed_world(tmp_path, DEFAULT_POSES)
    plain, _, _ = _posed_world(tmp_path, IDENTITY_ONLY)
    m = posed.manifest
    assert m.count == 8 * len(DEFAULT_POSES) and m.n_patients == 8 and m.poses == DEFAULT_POSES
    assert m.poses_digest == DEFAULT_POSES.digest and len(m.rows) == 8
    assert m.candidates == min(m.count, 16 * len(DEFAULT_POSES)) and m.ef >= m.candidates
    assert m.calibration.n_patients == 8
    grid = preprocess(vols[3], enc.preprocess).data
    shifted = apply_pose(grid, Pose(translate_vox=(0.0, 3.0, 0.0)))
    (emb,) = [p.embedding for p in embed_volumes([Volume(shifted, np.eye(4), (1.0,) * 3, "c", pid(99))], enc)]
    near_posed, near_plain = posed.search(emb), plain.search(emb)
    assert near_posed.patient_ids[0] == pid(3)
    assert near_posed.similarities[0] == pytest.approx(1.0, abs=1e-5)
    assert near_plain.similarities[0] < near_posed.similarities[0] - 0.05


def test_posed_index_refuses_edited_poses(tmp_path: Path) -> None:
    _, enc, _ = _posed_world(tmp_path, DEFAULT_POSES)
    index_dir = tmp_path / f"idx-{len(DEFAULT_POSES)}"
    data = json.loads((index_dir / MANIFEST_FILE).read_text())
    data["poses"]["poses"][2]["translate_vox"] = [9.0, 0.0, 0.0]
    (index_dir / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match=r"poses digest [0-9a-f]{12}… does not match the recorded poses"):
        TrainingIndex.load(index_dir, enc)


def test_build_refuses_probe_count_not_matching_poses(tmp_path: Path, encoder: ProjectionEncoder) -> None:
    v = unit_rows(10, DIM)
    probes = [Probe(Embedding(x, encoder.sha256), "a" * 64) for x in v]
    cal = leave_one_patient_out(v, [pid(i) for i in range(10)], 0)
    with pytest.raises(UsageError, match=r"and 86 probe\(s\) per volume; got 10 probes, 10 ids, 10 hashes"):
        build_index(
            probes,
            [pid(i) for i in range(10)],
            ["a" * 64] * 10,
            encoder,
            tmp_path / "n",
            cal,
            poses=DEFAULT_POSES,
        )


def test_leave_one_patient_out_queries_only_given_rows() -> None:
    rows = np.asarray([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1]], dtype=np.float32)
    # two patients, two rows each; row 1 (a pose of patient 0) is what makes patient 1 look close
    ids = [pid(0), pid(0), pid(1), pid(1)]
    all_rows = leave_one_patient_out(rows, ids, 0)
    as_read = leave_one_patient_out(rows, ids, 0, query_rows=np.asarray([0, 2]))
    assert all_rows.similarities == pytest.approx((0.96, 0.96))
    assert as_read.similarities == pytest.approx((0.6, 0.96))


def test_shipped_index_ids_are_demo_key_hashes_of_file_digests() -> None:
    """Every bundled row's pseudonym is HMAC(demo key, sha256 of its file): no machine path in it."""
    from gate.identity import Pseudonymizer, load_or_create_key
    from gate.index import DEFAULT_INDEX_DIR

    key = Path(gate.index.__file__).parent / "models" / "demo-pseudonym.key"
    pseudo = Pseudonymizer(load_or_create_key(key))
    rows = json.loads((DEFAULT_INDEX_DIR / MANIFEST_FILE).read_text())["rows"]
    assert len({r["patient_id"] for r in rows}) == len(rows) == 261
    assert all(r["patient_id"] == pseudo.pseudonym("sha256:" + r["file_sha256"]) for r in rows)


@pytest.mark.realdata
def test_shipped_index_ids_come_from_the_shipped_demo_key(hippocampus_dir: Path, tmp_path: Path) -> None:
    """Reading a public MSD file with the demo key, from anywhere, gives a bundled index id."""
    from gate.identity import Pseudonymizer, load_or_create_key
    from gate.index import DEFAULT_INDEX_DIR
    from gate.volume import ReadOptions, read_volumes

    key = Path(gate.index.__file__).parent / "models" / "demo-pseudonym.key"
    manifest = json.loads((DEFAULT_INDEX_DIR / MANIFEST_FILE).read_text())
    ids = {r["patient_id"] for r in manifest["rows"]}
    options = ReadOptions(pseudonymizer=Pseudonymizer(load_or_create_key(key)))
    moved = tmp_path / "elsewhere" / "renamed.nii.gz"
    moved.parent.mkdir()
    moved.write_bytes((hippocampus_dir / "hippocampus_001.nii.gz").read_bytes())
    (vol,) = read_volumes(hippocampus_dir / "hippocampus_001.nii.gz", options)
    (copy,) = read_volumes(moved, options)
    assert vol.patient_id in ids and copy.patient_id == vol.patient_id
