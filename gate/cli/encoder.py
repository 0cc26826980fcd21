"""``gate encoder train|export`` and ``gate eval`` (the detection benchmark).

torch and MONAI are imported inside the commands, never at module import.
"""

from __future__ import annotations

from pathlib import Path

import click

from gate.cli.options import input_options, read_options


def _load_grids(
    folder: Path,
    opts_args: tuple,
    grid: tuple[int, int, int] | None = None,
    margin: int = 0,
    config: object | None = None,
) -> tuple[object, list, str]:
    """Read every volume under ``folder`` and preprocess it onto the grid (plus ``margin``).

    Returns:
        (N, 1, X + 2m, Y + 2m, Z + 2m) array, the volumes, and the data digest (sha256 of the
        sorted file digests).

    """
    from gate.encoder.data import load_folder
    from gate.preprocess import PreprocessConfig

    if config is not None:
        cfg = config
    else:
        cfg = PreprocessConfig() if grid is None else PreprocessConfig(grid=grid)
    return load_folder(folder, read_options(*opts_args), cfg, margin)  # type: ignore[arg-type]


def preprocess_config(path: Path | None, overrides: dict[str, object]) -> object:
    """A validated PreprocessConfig from an optional YAML file and flag overrides.

    Raises:
        UsageError: unreadable YAML, not a mapping, unknown field or bad value (one line).

    """
    import yaml
    from pydantic import ValidationError

    from gate.errors import UsageError
    from gate.preprocess import PreprocessConfig

    values: dict[str, object] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise UsageError(f"{path}: unreadable YAML ({str(err).splitlines()[0]})") from err
        if not isinstance(loaded, dict):
            raise UsageError(f"{path}: expected a mapping of PreprocessConfig fields")
        values.update(loaded)
    values.update(overrides)
    if values.get("intensity") == "percentile" and "hu_window" not in overrides:
        values.pop("hu_window", None)
    try:
        return PreprocessConfig(**values)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "config"
        raise UsageError(
            f"preprocessing {field}: {first['msg']} (fields: {', '.join(PreprocessConfig.model_fields)})"
        ) from None


def parse_augment(overrides: tuple[str, ...]) -> object:
    """``FIELD=VALUE`` strings (VALUE is YAML: a number or a ``[low, high]`` list) -> AugmentConfig.

    Raises:
        UsageError: malformed item, unknown field or bad value (pydantic's message, one line).

    """
    import yaml
    from pydantic import ValidationError

    from gate.encoder.augment import AugmentConfig
    from gate.errors import UsageError

    values: dict[str, object] = {}
    for item in overrides:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--augment expects FIELD=VALUE; got {item!r}")
        values[name.strip()] = yaml.safe_load(text)
    try:
        return AugmentConfig(**values)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise UsageError(
            f"--augment {field}: {first['msg']} (got {first.get('input')!r}; "
            f"fields: {', '.join(AugmentConfig.model_fields)})"
        ) from None


@click.group()
def encoder() -> None:
    """Train and export the 3D encoder that embeds volumes for the training index."""


@encoder.command("train")
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="Folder (or file) of training volumes.",
)
@click.option(
    "--holdout",
    "holdout_dir",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Volumes of other patients, for per-epoch validation metrics.",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Checkpoint folder (resumed if it holds a checkpoint of the same run).",
)
@click.option(
    "--objective", type=click.Choice(["contrastive", "ssim"]), default="contrastive", show_default=True
)
@click.option("--epochs", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's choice)."
)
@click.option(
    "--pooling",
    type=click.Choice(["flatten", "mean"]),
    default="flatten",
    show_default=True,
    help="Head: flatten the 2x3x2 feature map, or average it (more shift-invariant).",
)
@click.option(
    "--augment",
    "augment_overrides",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Override one augmentation range (repeatable), e.g. rotate_deg=5 or gamma=[0.8,1.3]; "
    "fields and defaults: gate/encoder/augment.py.",
)
@click.option("--no-resume", is_flag=True, help="Refuse to continue an existing checkpoint.")
@click.option(
    "--preprocess-config",
    "preprocess_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="YAML with PreprocessConfig fields (grid, spacing_mm, clip_percentiles, intensity, "
    "hu_window, percentile_region, fov); the flags below override it.",
)
@click.option("--grid", type=(int, int, int), default=None, help="Encoder grid X Y Z in voxels [32 48 32].")
@click.option("--spacing", type=(float, float, float), default=None, help="Voxel size X Y Z in mm [1 1 1].")
@click.option(
    "--fov",
    type=click.Choice(["crop", "fit"]),
    default=None,
    help="Field of view: centre-crop/pad to the grid (crop, default) or resample all of it onto it (fit).",
)
@click.option(
    "--intensity",
    type=click.Choice(["percentile", "hu_window"]),
    default=None,
    help="MR percentile clip (default) or a fixed CT window in HU (--hu-window).",
)
@click.option(
    "--hu-window", type=(float, float), default=None, help="CT window LOW HIGH in HU, e.g. -1000 1000."
)
@click.option(
    "--clip-percentiles", type=(float, float), default=None, help="Percentile clip LOW HIGH [0.5 99.5]."
)
@click.option(
    "--percentile-region",
    type=click.Choice(["all", "foreground"]),
    default=None,
    help="Percentiles over all voxels (default) or over the foreground (above the minimum).",
)
@input_options
def train_command(
    data_dir: Path,
    holdout_dir: Path | None,
    out_dir: Path,
    objective: str,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: str,
    threads: int | None,
    pooling: str,
    augment_overrides: tuple[str, ...],
    no_resume: bool,
    preprocess_file: Path | None,
    grid: tuple[int, int, int] | None,
    spacing: tuple[float, float, float] | None,
    fov: str | None,
    intensity: str | None,
    hu_window: tuple[float, float] | None,
    clip_percentiles: tuple[float, float] | None,
    percentile_region: str | None,
    id_key_file: Path | None,
    patient_map: Path | None,
    patient_pattern: str | None,
    max_voxels: int,
) -> None:
    """Self-supervised training (NT-Xent contrastive, or 3D-SSIM regression)."""
    import torch

    from gate.encoder.model import EncoderSpec
    from gate.encoder.train import EpochReport, TrainConfig, train
    from gate.errors import UsageError

    if threads is not None:
        torch.set_num_threads(threads)
    opts = (id_key_file, patient_map, patient_pattern, max_voxels)
    flags = {
        "grid": grid,
        "spacing_mm": spacing,
        "fov": fov,
        "intensity": intensity,
        "hu_window": hu_window,
        "clip_percentiles": clip_percentiles,
        "percentile_region": percentile_region,
    }
    cfg = preprocess_config(preprocess_file, {k: v for k, v in flags.items() if v is not None})
    if no_resume and (out_dir / "checkpoint.json").exists():
        raise UsageError(f"{out_dir} already holds a checkpoint and --no-resume was given; use a new --out")
    try:
        spec = EncoderSpec(grid=cfg.grid, pooling=pooling)  # type: ignore[arg-type, attr-defined]
    except ValueError as err:  # pydantic's ValidationError
        raise UsageError(f"--grid {cfg.grid}: {str(err).splitlines()[1].strip()}") from None  # type: ignore[attr-defined]
    config = TrainConfig(
        augment=parse_augment(augment_overrides),
        objective=objective,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,  # type: ignore[arg-type]
        spec=spec,
        preprocess=cfg,
    )
    # training volumes carry the window-shift margin; the holdout (validation only) does not
    grids, _, digest = _load_grids(data_dir, opts, cfg.grid, config.augment.window_shift_vox, cfg)
    hold = _load_grids(holdout_dir, opts, config=cfg)[0] if holdout_dir is not None else None
    click.echo(
        f"training {objective} encoder on {len(grids)} volumes (data {digest[:12]}), "  # type: ignore[arg-type]
        f"{epochs} epochs, device {device}",
        err=True,
    )

    def progress(r: EpochReport) -> None:
        extra = ""
        if r.holdout:
            extra = " " + " ".join(f"{k}={v:.4f}" for k, v in r.holdout.items())
        click.echo(f"epoch {r.epoch}/{r.epochs} loss={r.loss:.4f} time={r.seconds:.1f}s{extra}", err=True)

    train(grids, config, out_dir, digest, holdout=hold, device=device, on_epoch=progress)  # type: ignore[arg-type]
    click.echo(str(out_dir / "checkpoint.npz"))


@encoder.command("export")
@click.option(
    "--checkpoint",
    "ckpt_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Checkpoint folder written by `gate encoder train`.",
)
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="Real volumes for the parity check (the training folder records its size in the card).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Model folder to write (encoder.onnx, encoder.json, model_card.md/json).",
)
@click.option(
    "--parity-volumes",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="How many of the --data volumes the parity check runs on.",
)
@click.option(
    "--tolerance",
    type=click.FloatRange(min=0),
    default=None,
    help="Parity tolerance, max |torch - onnxruntime| (default 1e-4).",
)
@click.option(
    "--benchmark",
    "benchmark_json",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Detection benchmark JSON (from `gate eval`) to quote in the model card.",
)
@click.option("--force", is_flag=True, help="Replace an existing model folder.")
@input_options
def export_command(
    ckpt_dir: Path,
    data_dir: Path,
    out_dir: Path,
    parity_volumes: int,
    tolerance: float | None,
    benchmark_json: Path | None,
    force: bool,
    id_key_file: Path | None,
    patient_map: Path | None,
    patient_pattern: str | None,
    max_voxels: int,
) -> None:
    """Export a checkpoint to ONNX, check parity with torch on real volumes, write the model card."""
    import json

    from gate.encoder.export import PARITY_TOLERANCE, export_encoder
    from gate.encoder.train import load_checkpoint
    from gate.volume import discover

    ck = load_checkpoint(ckpt_dir)
    grids, _, digest = _load_grids(
        data_dir,
        (id_key_file, patient_map, patient_pattern, max_voxels),
        ck.config.preprocess.grid,
        config=ck.config.preprocess,
    )
    cfg = ck.config
    training = {
        "data_digest": ck.data_digest,
        "data_name": data_dir.name if digest == ck.data_digest else "(not the --data folder)",
        "n_volumes": len(grids) if digest == ck.data_digest else None,  # type: ignore[arg-type]
        "data_is_msd_hippocampus": any(
            "hippocampus" in str(p.resolve()).lower() for p in discover([data_dir])
        ),
        "epochs": ck.epoch,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "objective": cfg.objective,
        "augment": cfg.augment.model_dump(mode="json"),
        "final_loss": ck.history[-1]["loss"] if ck.history else None,
        "final_holdout": ck.history[-1].get("holdout") if ck.history else None,
        "train_seconds": round(sum(h["seconds"] for h in ck.history), 1),
    }
    bench = None
    if benchmark_json is not None:
        from gate.encoder.benchmark import markdown_table

        result = json.loads(benchmark_json.read_text())
        bench = {
            "source": benchmark_json.name,
            "note": "measured with an encoder of this recipe trained on the benchmark's train split "
            f"({result['n_train']} train / {result['n_holdout']} holdout volumes, split seed "
            f"{result.get('split_seed')}); see docs/encoder.md",
            "pooled": {name: m["pooled"] for name, m in result["methods"].items()},
            "markdown": markdown_table(result),
        }
    manifest = export_encoder(
        ck.model,
        cfg.spec.grid,
        out_dir,
        grids[:parity_volumes],  # type: ignore[index]
        preprocess=cfg.preprocess,
        objective=cfg.objective,
        dim=cfg.spec.dim,
        architecture=cfg.spec.model_dump(mode="json"),
        training=training,
        benchmark=bench,
        tolerance=PARITY_TOLERANCE if tolerance is None else tolerance,
        overwrite=force,
    )
    click.echo(
        f"parity max abs diff {manifest.parity['max_abs_diff']:.2e} "
        f"(tolerance {manifest.parity['tolerance']:.0e})",
        err=True,
    )
    click.echo(f"{manifest.onnx_sha256}  {out_dir / manifest.onnx_file}")


@click.command("eval")
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Dataset folder; it is split into train / holdout patients (one file = one patient).",
)
@click.option(
    "--encoder",
    "encoders",
    multiple=True,
    metavar="NAME=DIR",
    help="An exported encoder folder to benchmark (repeatable); it should be trained on the "
    "train split only (see --write-split).",
)
@click.option("--holdout-fraction", type=click.FloatRange(0.01, 0.9), default=0.2, show_default=True)
@click.option("--split-seed", type=int, default=0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Perturbation seed.")
@click.option(
    "--ssim-subset",
    type=click.IntRange(min=1),
    default=40,
    show_default=True,
    help="Candidates per family scored by the (slow) 3D SSIM baseline.",
)
@click.option("--no-sweep", is_flag=True, help="Default severities only.")
@click.option(
    "--poses",
    "poses_name",
    type=click.Choice(["default", "none"]),
    default="default",
    show_default=True,
    help="Also score each encoder as `gate index build` indexes it: training volumes under these "
    "poses (reported as NAME+poses).",
)
@click.option(
    "--verify-poses",
    type=click.Choice(["compact", "default", "none"]),
    default=None,
    help="Also score each encoder as a verifying index judges (gate.verify): training volumes under "
    "these poses, the top-5 patients verified by alignment, the decision's two-score rule "
    "(reported as NAME+verify:POSES, and the verified NCC alone as NAME+ncc:POSES).",
)
@click.option(
    "--no-baselines",
    is_flag=True,
    help="Skip Pearson (with and without --poses), SSIM, Dar's rule and the untrained encoder.",
)
@click.option(
    "--validation-fraction",
    type=click.FloatRange(0.1, 0.9),
    default=0.5,
    show_default=True,
    help="Share of the holdout patients (and of the positives) whose scores set the test-split "
    "threshold; the test numbers come from the rest.",
)
@click.option("--validation-seed", type=int, default=0, show_default=True)
@click.option(
    "--partial-copy",
    is_flag=True,
    help="Also run the partial-copy family: the train volumes after the first 40 (the windows' "
    "validation set), and every holdout volume as the negatives, at a seeded random position in "
    "an 80x112x80 mm field of view, on an empty and a tissue-like background, judged by windows "
    "(gate.windows) against the train volumes under --poses; 1-3 s per volume per background.",
)
@click.option(
    "--write-split",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write train/ and holdout/ folders of symlinks for this split, then exit.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for detection.json and detection.md (default: print the table only).",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@input_options
def eval_command(
    data_dir: Path,
    encoders: tuple[str, ...],
    holdout_fraction: float,
    split_seed: int,
    seed: int,
    ssim_subset: int,
    no_sweep: bool,
    poses_name: str,
    verify_poses: str | None,
    no_baselines: bool,
    validation_fraction: float,
    validation_seed: int,
    partial_copy: bool,
    write_split: Path | None,
    out_dir: Path | None,
    threads: int | None,
    id_key_file: Path | None,
    patient_map: Path | None,
    patient_pattern: str | None,
    max_voxels: int,
) -> None:
    """Detection benchmark: exact copies, near copies per perturbation family, novel patients."""
    import json

    import numpy as np
    import torch

    from gate.digest import sha256_file, sha256_json
    from gate.embed import Encoder
    from gate.encoder import benchmark as bm
    from gate.encoder.model import EncoderSpec, build_encoder
    from gate.errors import UsageError
    from gate.poses import POSE_SETS
    from gate.preprocess import PreprocessConfig, preprocess_batch
    from gate.volume import discover, read_volumes

    if threads is not None:
        torch.set_num_threads(threads)
    files = discover([data_dir])
    if len(files) < 10:
        raise UsageError(f"{data_dir}: the benchmark needs >= 10 volumes; found {len(files)}")
    tr, ho = bm.split(len(files), holdout_fraction, split_seed)
    if write_split is not None:
        if write_split.exists():
            raise UsageError(f"{write_split} exists; choose a new folder for --write-split")
        for name, idx in (("train", tr), ("holdout", ho)):
            d = write_split / name
            d.mkdir(parents=True, exist_ok=False)
            for i in idx:
                (d / files[i].name).symlink_to(files[i].resolve())
        click.echo(f"{len(tr)} train / {len(ho)} holdout files under {write_split}")
        return
    opts = read_options(id_key_file, patient_map, patient_pattern, max_voxels)
    cfg = PreprocessConfig()
    raws = [v for p in files for v in read_volumes(p, opts)]
    if len(raws) != len(files):
        raise UsageError("the benchmark expects one volume per file")
    grids = preprocess_batch(raws, cfg)
    train_digest = sha256_json([sha256_file(files[i]) for i in tr])
    scorers: list[bm.Scorer] = []
    on_split: dict[str, bool] = {}
    for item in encoders:
        name, sep, path = item.partition("=")
        if not sep:
            raise UsageError(f"--encoder expects NAME=DIR; got {item!r}")
        enc = Encoder(Path(path), device="cpu")
        if enc.preprocess != cfg:
            raise UsageError(f"{path}: encoder preprocessing differs from the default; not comparable")
        on_split[name] = enc.manifest.training.get("data_digest") == train_digest
        scorers.append(bm.EmbeddingScorer(name, enc.embed_array))
        if poses_name != "none":
            scorers.append(
                bm.EmbeddingScorer(
                    f"{name}+poses", enc.embed_array, POSE_SETS[poses_name], [raws[i] for i in tr], cfg
                )
            )
        if verify_poses is not None:
            train_raws = [raws[i] for i in tr]
            shared: dict[str, object] = {}
            scorers += [
                bm.VerifiedScorer(
                    f"{name}+verify:{verify_poses}",
                    enc.embed_array,
                    POSE_SETS[verify_poses],
                    train_raws,
                    cfg,
                    shared=shared,
                ),
                bm.VerifiedScorer(
                    f"{name}+ncc:{verify_poses}",
                    enc.embed_array,
                    POSE_SETS[verify_poses],
                    train_raws,
                    cfg,
                    mode="verified",
                    shared=shared,
                ),
            ]
        if not no_baselines:
            scorers.append(bm.DarScorer(f"dar:{name}", enc.embed_array))
    if not no_baselines:
        untrained = build_encoder(EncoderSpec(grid=cfg.grid), seed=0)

        def embed_untrained(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return torch.cat(
                    [untrained(torch.from_numpy(x[i : i + 64])) for i in range(0, len(x), 64)]
                ).numpy()

        scorers.append(bm.PearsonScorer())
        if poses_name != "none":
            scorers.append(bm.PearsonScorer(POSE_SETS[poses_name], [raws[i] for i in tr], cfg))
        scorers += [
            bm.EmbeddingScorer("untrained_encoder", embed_untrained),
            bm.SSIMScorer(ssim_subset),
        ]
    result = bm.run_benchmark(
        grids[tr],
        [raws[i] for i in tr],
        grids[ho],
        scorers,
        cfg,
        seed=seed,
        sweep=not no_sweep,
        progress=lambda m: click.echo(m, err=True),
        validation_fraction=validation_fraction,
        validation_seed=validation_seed,
    )
    result.update(
        {
            "data": str(data_dir),
            "split_seed": split_seed,
            "holdout_fraction": holdout_fraction,
            "train_digest": train_digest,
            "encoder_trained_on_train_split": on_split,
            "ssim_subset": ssim_subset,
            "poses": poses_name,
        }
    )
    if partial_copy:
        result["partial_copy"] = {}
        for item in encoders:
            name, _, path = item.partition("=")
            enc = Encoder(Path(path), device="cpu")
            variants = [(f"{name}+poses", poses_name, False)]
            if verify_poses is not None:
                variants.append((f"{name}+verify:{verify_poses}", verify_poses, True))
            for label, poses_of, verify in variants:
                result["partial_copy"][label] = bm.partial_copy_family(
                    [raws[i] for i in tr],
                    [raws[i] for i in ho],
                    enc.embed_array,
                    cfg,
                    POSE_SETS[poses_of],
                    seed=seed + 1,
                    positives=slice(bm.PARTIAL_VALIDATION, None),
                    progress=lambda m: click.echo(m, err=True),
                    verify=verify,
                )
    table = bm.markdown_methods(result) + "\n" + bm.markdown_table(result)
    if partial_copy:
        table += bm.markdown_partial(result)
    click.echo(table)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "detection.json").write_text(json.dumps(result, indent=1) + "\n")
        (out_dir / "detection.md").write_text(
            "# Detection benchmark\n\n" + table + "\n## Severity sweep\n\n" + bm.markdown_sweep(result)
        )
        click.echo(f"wrote {out_dir / 'detection.json'} and detection.md", err=True)
