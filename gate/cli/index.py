"""``gate index build``: embed the training volumes and write a verified index folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import numpy as np

from gate.calibration import Calibration, holdout, leave_one_patient_out
from gate.cli.options import input_options, read_options
from gate.digest import sha256_file, sha256_source
from gate.domain import Domain, measure_domain
from gate.engine import Engine, EngineConfig, engine_options, open_engine
from gate.errors import ExitCode, GateError, InputError, IntegrityError, UsageError
from gate.index import DEFAULT_SEED, EmbeddingModel, Probe, build_index
from gate.poses import IDENTITY_ONLY, POSE_SETS, PoseSet
from gate.shards import SHARDS_FILE, build_sharded
from gate.values import Volume
from gate.verify import VerifySetup, prepare_verification
from gate.volume import ReadOptions, discover, read_volumes

DEVICES = ("auto", "cpu", "cuda")

F = TypeVar("F", bound=Callable[..., Any])


def encoder_options(func: F) -> F:
    """Add ``--encoder DIR`` (default: the shipped encoder) and ``--device auto|cpu|cuda``."""
    func = click.option(
        "--device",
        type=click.Choice(DEVICES),
        default="auto",
        show_default=True,
        help="onnxruntime device; cuda fails (exit 3) when CUDA is unavailable.",
    )(func)
    return click.option(
        "--encoder",
        "encoder_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Encoder folder (encoder.onnx + encoder.json). Must be the index's encoder; default: "
        "the copy the index keeps (INDEX/encoder/) or the shipped encoder, whichever the index "
        "records; needed only when the index's encoder moved.",
    )(func)


def load_encoder(encoder_dir: Path | None, device: str) -> EmbeddingModel:
    """Load the ONNX encoder in ``encoder_dir`` (default: the shipped one), verified by gate.embed."""
    from gate.embed import DEFAULT_ENCODER_DIR, Encoder

    return Encoder(encoder_dir or DEFAULT_ENCODER_DIR, device=device)  # type: ignore[arg-type]


INDEX_ENCODER_DIR = "encoder"
"""``gate index build`` keeps a copy of its encoder (``encoder.onnx`` + ``encoder.json``, 3 MB for
the shipped one) in this sub-folder of the index, so the index finds its own encoder."""


def encoder_for_index(encoder_dir: Path | None, index_dir: Path) -> Path | None:
    """The encoder folder to use with ``index_dir``: ``--encoder`` when given, else the index's own.

    Without ``--encoder``, the index's copy (``index_dir/encoder/``) is used when its
    ``encoder.json`` names the ONNX digest the index manifest (a shard set's ``shards.json``)
    records, else the shipped encoder (None) when it does: so ``--encoder`` is needed only when
    the index's encoder moved. No match leaves the default, and loading the index then refuses it
    with the digest mismatch. The chosen encoder is still verified (its ONNX bytes hashed) by
    :class:`gate.embed.Encoder`.
    """
    if encoder_dir is not None:
        return encoder_dir
    from gate.embed import DEFAULT_ENCODER_DIR
    from gate.embed import read_manifest as read_encoder_manifest
    from gate.shards import index_encoder_sha256

    try:
        wanted = index_encoder_sha256(index_dir)
    except IntegrityError:
        return None  # the index load reports it
    for place in (index_dir / INDEX_ENCODER_DIR, DEFAULT_ENCODER_DIR):
        try:
            if read_encoder_manifest(place).onnx_sha256 == wanted:
                return None if place == DEFAULT_ENCODER_DIR else place
        except IntegrityError:
            continue
    return None


def keep_encoder_copy(encoder: EmbeddingModel, encoder_dir: Path | None, index_dir: Path) -> None:
    """Copy the encoder that built ``index_dir`` into ``index_dir/encoder/`` (temp name, rename)."""
    import shutil
    import tempfile

    from gate.embed import DEFAULT_ENCODER_DIR, MANIFEST_FILE
    from gate.embed import read_manifest as read_encoder_manifest

    source = encoder_dir or DEFAULT_ENCODER_DIR
    try:
        manifest = read_encoder_manifest(source)
    except IntegrityError:
        return  # not an ONNX encoder folder (a test double): nothing to keep
    if manifest.onnx_sha256 != encoder.sha256:
        return
    tmp = Path(tempfile.mkdtemp(prefix=".encoder.", dir=index_dir))
    try:
        for name in (MANIFEST_FILE, manifest.onnx_file):
            shutil.copyfile(source / name, tmp / name)
        tmp.rename(index_dir / INDEX_ENCODER_DIR)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_all(paths: list[Path], options: ReadOptions) -> tuple[list[Volume], list[str], list[InputError]]:
    """Read every source; collect (never skip silently) the ones that fail.

    Returns:
        Volumes, the sha256 of each volume's source file, and the errors.

    """
    volumes: list[Volume] = []
    hashes: list[str] = []
    errors: list[InputError] = []
    sources: list[Path] = []
    for path in paths:
        try:
            sources.extend(discover([path]))
        except InputError as err:
            errors.append(err)
    for source in sources:
        try:
            vols = read_volumes(source, options)
        except InputError as err:
            errors.append(err)
            continue
        digest = sha256_source(source)
        volumes.extend(vols)
        hashes.extend([digest] * len(vols))
    return volumes, hashes, errors


def _fail_on(errors: list[InputError]) -> None:
    if errors:
        for err in errors:
            click.echo(f"gate: error: {err}", err=True)
        click.echo(f"gate: {len(errors)} input(s) unreadable; no index written", err=True)
        raise SystemExit(int(ExitCode.INPUT))


@click.group()
def index() -> None:
    """Build the index of the training patients that `gate check` compares against."""


@index.command("build")
@click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Training volumes: files or folders (repeatable).",
)
@encoder_options
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="New index folder (must not exist).",
)
@click.option(
    "--holdout",
    "holdout_paths",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Volumes of other real patients, for calibration; default: leave-one-patient-out.",
)
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True, help="hnswlib and self-test seed.")
@click.option(
    "--poses",
    "poses_name",
    type=click.Choice(sorted(POSE_SETS)),
    default=None,
    help="Index every training volume under these poses (gate.poses): compact (8 rows per volume: "
    "as read, flipped, turned 10 degrees either way about each axis), default (86: also shifts of "
    "1.5-3 voxels, turns of 5-10 degrees, moved and cut crop windows) or none (as read only). "
    "Unset: compact on an index that verifies (the alignment finds what the other rows would), "
    "default with --no-verify.",
)
@input_options
@click.option(
    "--shards",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Split the index by patient into this many hnswlib graphs, built in parallel (see gate.shards).",
)
@click.option(
    "--window-fov",
    type=(click.FloatRange(min=0, min_open=True),) * 3,
    default=None,
    metavar="X Y Z",
    help="Also judge candidates larger than the training volumes, up to this field of view (mm, "
    "canonical axes), on windows of the grid over all of them (gate.windows); default: refuse "
    "them as out of domain.",
)
@click.option(
    "--verify/--no-verify",
    "verify",
    default=True,
    show_default=True,
    help="Store the preprocessed training grids so every candidate's retrieved patients are "
    "re-scored by alignment (gate.verify), and calibrate that score on real patients and on "
    "simulated copies (gate.copies). The index folder then holds training voxels: keep it "
    "as private as the training data.",
)
@engine_options
def build(
    data: tuple[Path, ...],
    encoder_dir: Path | None,
    out_dir: Path,
    holdout_paths: tuple[Path, ...],
    seed: int,
    poses_name: str | None,
    device: str,
    id_key_file: Path | None,
    patient_map: Path | None,
    patient_pattern: str | None,
    max_voxels: int,
    shards: int,
    window_fov: tuple[float, float, float] | None,
    verify: bool,
    engine: str,
    ray_address: str | None,
    workers: int,
    batch_size: int,
    num_gpus: float,
) -> None:
    """Embed every training volume and write an hnswlib index with its JSON manifest.

    With --shards N the patients are split into N shards (a patient never straddles two), one
    graph each, built in parallel (local processes, or Ray tasks), bound by shards.json.

    The manifest holds digests and pseudonymous patient ids only (no names, no paths), the
    calibration distribution and the self-test result. Exits 3 if any input is unreadable.
    """
    options = read_options(id_key_file, patient_map, patient_pattern, max_voxels)
    encoder = load_encoder(encoder_dir, device)
    volumes, hashes, errors = read_all(list(data), options)
    held: list[Volume] = []
    if holdout_paths:
        held, _, more = read_all(list(holdout_paths), options)
        errors.extend(more)
    _fail_on(errors)
    try:
        domain = measure_domain(volumes, encoder.preprocess, window_fov_mm=window_fov)
    except ValueError as err:
        raise UsageError(f"--window-fov: {err}") from err
    if poses_name is None:  # what the detection benchmarks measured (docs/encoder.md, "A small index")
        poses_name = "compact" if verify else "default"
    poses = POSE_SETS[poses_name]
    click.echo(
        f"embedding {len(volumes)} training volume(s) x {len(poses)} pose(s) with encoder "
        f"{encoder.sha256[:12]}…"
    )
    config = EngineConfig(engine, ray_address, workers, batch_size, num_gpus, encoder_dir, device)
    with open_engine(config, encoder) as eng:
        _build_on(
            eng, volumes, held, hashes, poses, encoder, encoder_dir, out_dir, seed, shards, domain, verify
        )


def _build_on(
    eng: Engine,
    volumes: list[Volume],
    held: list[Volume],
    hashes: list[str],
    poses: PoseSet,
    encoder: EmbeddingModel,
    encoder_dir: Path | None,
    out_dir: Path,
    seed: int,
    shards: int,
    domain: Domain,
    verify: bool = True,
) -> None:
    probes = eng.embed_volumes(volumes, poses)
    patient_ids = [v.patient_id for v in volumes]
    row_patient_ids = [pid for pid in patient_ids for _ in range(len(poses))]
    vectors = _matrix(probes)
    calibration: Calibration
    held_vectors = None
    if held:
        click.echo(f"calibrating on {len(held)} holdout volume(s)")
        held_vectors = _matrix(eng.embed_volumes(held, IDENTITY_ONLY))
        calibration = holdout(held_vectors, [v.patient_id for v in held], vectors, row_patient_ids)
    else:
        as_read = np.arange(0, len(vectors), len(poses))
        calibration = leave_one_patient_out(vectors, row_patient_ids, seed, query_rows=as_read)
    p50, p90, p99 = (float(np.percentile(calibration.similarities, q)) for q in (50, 90, 99))
    setup = None
    if verify:
        click.echo("verification: storing training grids, calibrating on real patients and simulated copies")
        setup = prepare_verification(
            volumes, vectors, poses, encoder.preprocess, encoder.embed_array, seed, held, held_vectors
        )
        calibration = setup.cosine_calibration  # the cosine as verified checks compute it
        p50, p90, p99 = (float(np.percentile(calibration.similarities, q)) for q in (50, 90, 99))
    if shards > 1:
        sharded = build_sharded(
            probes,
            patient_ids,
            hashes,
            encoder,
            out_dir,
            calibration,
            shards,
            seed,
            poses,
            eng.mapper,
            domain,
            setup,
        )
        keep_encoder_copy(encoder, encoder_dir, out_dir)
        click.echo(f"index: {out_dir} ({shards} shards)")
        click.echo(
            f"  volumes {len(volumes)}, rows {sharded.count}, patients {sharded.n_patients}, "
            f"dim {sharded.dim}, poses {len(poses)}"
        )
        for entry in sharded.shards:
            click.echo(
                f"  {entry.name}: rows {entry.count}, patients {entry.n_patients}, "
                f"self-test passed, manifest sha256 {entry.manifest_sha256[:12]}…"
            )
        click.echo(
            f"  calibration ({calibration.method.value}, {calibration.n_patients} patients): "
            f"nearest-training similarity p50 {p50:.4f}, p90 {p90:.4f}, p99 {p99:.4f}"
        )
        _echo_verification(setup, calibration)
        click.echo(f"  shards.json sha256 {sha256_file(out_dir / SHARDS_FILE)}")
        return
    manifest = build_index(
        probes, patient_ids, hashes, encoder, out_dir, calibration, seed, poses, domain, setup
    )
    keep_encoder_copy(encoder, encoder_dir, out_dir)
    click.echo(f"index: {out_dir}")
    click.echo(
        f"  volumes {len(volumes)}, rows {manifest.count}, patients {manifest.n_patients}, "
        f"dim {manifest.dim}, poses {len(manifest.poses)}, M {manifest.M}, ef {manifest.ef}, "
        f"candidates {manifest.candidates}"
    )
    click.echo(
        f"  self-test recall@1 {manifest.self_test.recall_at_1:.4f} "
        f"({manifest.self_test.probes} probes x cosines {list(manifest.self_test.cosines)})"
    )
    click.echo(
        f"  calibration ({calibration.method.value}, {calibration.n_patients} patients): "
        f"nearest-training similarity p50 {p50:.4f}, p90 {p90:.4f}, p99 {p99:.4f}"
    )
    click.echo(f"  domain: {domain.describe()}")
    _echo_verification(setup, calibration)
    click.echo(f"  index sha256 {manifest.index_sha256}")


def _echo_verification(setup: VerifySetup | None, calibration: Calibration) -> None:
    """Print the verified calibration and, per shipped policy, its copy-block and novel-pass rates."""
    if setup is None:
        click.echo("  verification: off (--no-verify)")
        return
    from gate.decide import pass_rate
    from gate.policy import load_policy, policy_names

    cal, copies = setup.calibration, setup.copies
    click.echo(
        f"  verification: shifts +-{setup.max_shift} voxels; verified score of real patients "
        f"({cal.method.value}, {cal.n_patients}) p50 {float(np.percentile(cal.similarities, 50)):.4f} "
        f"max {cal.similarities[-1]:.4f}; of {copies.n_patients} simulated copies "
        f"min {copies.similarities[0]:.4f} p1 {float(np.percentile(copies.similarities, 1)):.4f}"
    )
    ident, copies_ident = setup.identity, setup.copies_identity
    click.echo(
        f"  identity score of real patients p50 {float(np.percentile(ident.similarities, 50)):.4f} "
        f"max {ident.similarities[-1]:.4f}; of simulated copies p50 "
        f"{float(np.percentile(copies_ident.similarities, 50)):.4f} max {copies_ident.similarities[-1]:.4f}"
    )
    record = setup.record("0" * 64)
    for name in policy_names():
        policy = load_policy(name)
        try:
            blocked = 1.0 - pass_rate(setup.copy_pairs, policy, calibration, record)
            passed = pass_rate(setup.novel_pairs, policy, calibration, record)
        except GateError as err:
            click.echo(f"  policy {name}: cannot be resolved on this index ({err})")
            continue
        click.echo(
            f"  policy {name}: blocks {blocked:.2%} of {len(setup.copy_pairs)} simulated copies, passes "
            f"{passed:.2%} of {len(setup.novel_pairs)} real patients"
        )


def _matrix(probes: list[Probe]) -> np.ndarray:
    return np.stack([p.embedding.vector for p in probes]).astype(np.float32)
