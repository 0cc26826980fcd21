"""``gate ldm train`` (train the latent diffusion generator) and ``gate generate`` (gated sampling).

torch and MONAI are imported inside the commands, never at module import.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from gate.cli.options import input_options, read_options
from gate.errors import UsageError


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _ProgressLine:
    """One self-overwriting stderr line (only when stderr is a terminal; else every Nth update)."""

    def __init__(self, every: int = 50) -> None:
        self.tty = sys.stderr.isatty()
        self.every = every
        self.count = 0

    def show(self, text: str, force: bool = False) -> None:
        self.count += 1
        if self.tty:
            click.echo(f"\r{text[:150]:<150}", err=True, nl=False)
        elif force or self.count % self.every == 0:
            click.echo(text, err=True)

    def done(self) -> None:
        if self.tty:
            click.echo("", err=True)


@click.group()
def ldm() -> None:
    """Train the MONAI 3D latent diffusion generator."""


@ldm.command("export-bundle")
@click.option(
    "--generator",
    "generator_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="gate LDM folder (default: the shipped one).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="New MONAI bundle folder (never overwritten).",
)
def export_bundle_command(generator_dir: Path | None, out_dir: Path) -> None:
    """Write a gate LDM as a MONAI bundle (configs/inference.json + models/*.pt) for --generator."""
    from gate.generator.monai_bundle import bundle_digest, export_bundle
    from gate.generator.sample import DEFAULT_GENERATOR_DIR

    out = export_bundle(generator_dir or DEFAULT_GENERATOR_DIR, out_dir)
    click.echo(f"MONAI bundle {bundle_digest(out)[:12]} in {out}")


@ldm.command("train")
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="Folder (or file) of real training volumes.",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Model folder: weights.npz, generator.json, train_log.jsonl, checkpoints/.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="JSON file with LDMConfig fields (options below override it).",
)
@click.option("--seed", type=int, default=None, help="Random seed (default 0).")
@click.option("--ae-epochs", type=click.IntRange(min=1), default=None, help="Autoencoder epochs.")
@click.option("--unet-epochs", type=click.IntRange(min=1), default=None, help="UNet epochs.")
@click.option(
    "--duplicate-factor",
    type=click.IntRange(min=1),
    default=None,
    help="Memorization-prone mode: show every training volume N times per epoch.",
)
@click.option(
    "--train-subset",
    type=click.IntRange(min=1),
    default=None,
    help="Train on the first N volumes only (with --duplicate-factor: a copying generator).",
)
@click.option(
    "--snapshot-every",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also write usable weights every N UNet epochs.",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="torch CPU threads (0 = torch default).",
)
@input_options
def train_command(
    data_dir: Path,
    out_dir: Path,
    config_file: Path | None,
    seed: int | None,
    ae_epochs: int | None,
    unet_epochs: int | None,
    duplicate_factor: int | None,
    train_subset: int | None,
    snapshot_every: int,
    device: str,
    threads: int,
    **input_kwargs: Any,
) -> None:
    """Train both stages on real volumes; rerun with the same options to resume."""
    import torch

    from gate.generator.config import config_from_dict
    from gate.generator.train import EpochReport, StepReport, train, training_array
    from gate.volume import discover, read_volumes

    if threads:
        torch.set_num_threads(threads)
    raw: dict[str, Any] = {}
    if config_file is not None:
        try:
            raw = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UsageError(f"{config_file}: not a JSON config ({err})") from err
    overrides = {
        "seed": seed,
        "ae_epochs": ae_epochs,
        "unet_epochs": unet_epochs,
        "duplicate_factor": duplicate_factor,
        "train_subset": train_subset,
    }
    raw.update({k: v for k, v in overrides.items() if v is not None})
    config = config_from_dict(raw, str(config_file or "options"))
    options = read_options(**input_kwargs)
    volumes = [v for path in discover([data_dir]) for v in read_volumes(path, options)]
    data = training_array(volumes, config)
    click.echo(
        f"gate ldm train: {len(data)} volumes on grid {config.preprocess.grid}, "
        f"latent {config.latent_shape}, "
        f"config {config.digest[:12]} -> {out_dir}",
        err=True,
    )
    bar = _ProgressLine()

    def on_step(r: StepReport) -> None:
        bar.show(
            f"{r.stage} epoch {r.epoch + 1}/{r.epochs} step {r.step}/{r.steps} loss {r.loss:.4f} "
            f"ETA {_fmt_eta(r.eta_s)}"
        )

    def on_epoch(r: EpochReport) -> None:
        bar.show(
            f"{r.stage} epoch {r.epoch + 1}/{r.epochs} loss {r.loss:.5f} ({r.seconds:.1f} s)", force=True
        )

    t0 = time.perf_counter()
    manifest = train(
        data,
        config,
        out_dir,
        device=device,
        on_step=on_step,
        on_epoch=on_epoch,  # type: ignore[arg-type]
        snapshot_every=snapshot_every,
    )
    bar.done()
    click.echo(
        f"done in {time.perf_counter() - t0:.0f} s: autoencoder loss {manifest.autoencoder.final_loss:.5f}, "
        f"unet loss {manifest.unet.final_loss:.5f}, weights {manifest.weights_sha256[:12]} in {out_dir}"
    )


@click.command()
@click.option(
    "--n",
    "n",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Samples wanted in the bundle.",
)
@click.option(
    "--policy",
    "policy_name",
    default="strict",
    show_default=True,
    help="Shipped policy name (strict, standard, permissive) or a .yaml file.",
)
@click.option(
    "--max-candidates", type=click.IntRange(min=1), default=None, help="Candidate budget (default: 4 x --n)."
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=None,
    help="Run seed; candidate i is reproducible from (seed, i). Default: a fresh random seed, "
    "printed and recorded in the bundle manifest.",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Candidates per batch."
)
@click.option(
    "--ddim-steps",
    type=click.IntRange(min=1),
    default=None,
    help="DDIM steps (default: the generator's, see its model card).",
)
@click.option("--formats", default="nifti", show_default=True, help="Comma-separated: nifti,dicom.")
@click.option(
    "--out",
    "out_root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("gate-out"),
    show_default=True,
    help="Folder receiving the bundle gate-<run id>/.",
)
@click.option(
    "--audit-log",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="GATE_AUDIT_LOG",
    default=None,
    help="Audit log (default: $GATE_AUDIT_LOG, else <out>/audit.jsonl).",
)
@click.option(
    "--quarantine",
    "quarantine_root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep every candidate that is not exported under DIR/<run id>/ for `gate audit report` "
    "(internal: never inside a bundle). Default: <out>/quarantine.",
)
@click.option("--no-quarantine", is_flag=True, help="Do not keep the candidates that are not exported.")
@click.option(
    "--generator",
    "generator_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Generator folder: a gate LDM, a MONAI bundle (configs/inference.json + models/*.pt), or "
    "any format a gate.generators plug-in accepts (default: the shipped LDM).",
)
@click.option(
    "--encoder",
    "encoder_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Encoder folder (default: the shipped one; must be the index's encoder).",
)
@click.option(
    "--index",
    "index_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Index folder (default: the shipped one).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Device for the generator and the encoder; cuda fails when unavailable.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the summary as JSON.",
)
def generate(
    n: int,
    policy_name: str,
    max_candidates: int | None,
    seed: int | None,
    batch_size: int,
    ddim_steps: int | None,
    formats: str,
    out_root: Path,
    audit_log: Path | None,
    quarantine_root: Path | None,
    no_quarantine: bool,
    generator_dir: Path | None,
    encoder_dir: Path | None,
    index_dir: Path | None,
    device: str,
    json_path: Path | None,
) -> None:
    """Generate N synthetic volumes that pass the privacy gate, as a new bundle.

    Keeps generating until N candidates pass or --max-candidates are spent; every candidate is
    audited; only passes are exported, into <out>/gate-<run id>/. Exit codes: 0 N samples
    exported; 1 fewer than N passed within the budget (the passes are exported); 2 usage;
    3 integrity / input error; 4 internal error (3 and 4: nothing exported).
    """
    from gate.cli.index import encoder_for_index, load_encoder
    from gate.exporters import EXPORTERS
    from gate.generator.plugins import load_generator
    from gate.generator.sample import DEFAULT_GENERATOR_DIR
    from gate.index import DEFAULT_INDEX_DIR, TrainingIndex
    from gate.pipeline import GenerateRequest, Progress, run_generate
    from gate.policy import load_policy

    fmt = tuple(f.strip() for f in formats.split(",") if f.strip())
    unknown = [f for f in fmt if f not in EXPORTERS]
    if unknown or not fmt:
        raise UsageError(f"--formats {formats!r}: expected some of {', '.join(EXPORTERS)}")
    if seed is None:
        import secrets

        seed = secrets.randbelow(2**31)
    from gate.bundle import remove_stale_partials
    from gate.signing import load_or_create_signing_key

    signer = load_or_create_signing_key()
    if signer.created:
        click.echo(
            f"gate: made a demo site key {signer.path} (first use); run gate keys init on a real site, "
            f"verify with --public-key {signer.path.with_name('site.pub')}",
            err=True,
        )
    for stale in remove_stale_partials(out_root):
        click.echo(f"gate: removed {stale}, a partial bundle an earlier killed run left", err=True)
    request = GenerateRequest(
        n=n,
        max_candidates=max_candidates,
        seed=seed,
        batch_size=batch_size,
        ddim_steps=ddim_steps,
        formats=fmt,
        out_root=out_root,
        audit_log=audit_log,
        quarantine=not no_quarantine,
        quarantine_root=quarantine_root,
        signer=signer,
    )
    t0 = time.perf_counter()
    policy = load_policy(policy_name)
    generator = load_generator(generator_dir or DEFAULT_GENERATOR_DIR, device=device)
    index_dir = index_dir or DEFAULT_INDEX_DIR
    encoder = load_encoder(encoder_for_index(encoder_dir, index_dir), device)
    index = TrainingIndex.load(index_dir, encoder)
    provider = str(getattr(encoder, "provider", "unknown"))
    bar = _ProgressLine(every=1)

    def on_progress(p: Progress) -> None:
        rate = p.elapsed_s / max(p.candidates, 1)
        left = rate * (p.budget - p.candidates)
        if p.passed:
            left = min(left, p.elapsed_s / p.passed * (p.wanted - p.passed))
        bar.show(
            f"generate: {p.candidates}/{p.budget} candidates, {p.passed}/{p.wanted} passed, "
            f"{p.elapsed_s:.0f} s, ETA {_fmt_eta(left)}"
        )

    result = run_generate(
        request,
        generator,
        encoder,
        index,
        policy,
        provider,
        on_progress,
        load_seconds=time.perf_counter() - t0,
    )
    bar.done()
    _print_summary(result, policy.id, time.perf_counter() - t0, index_dir)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(_summary_json(result, policy.id, provider), indent=1) + "\n")
    raise SystemExit(int(result.exit_code))


def _summary_json(result: Any, policy_id: str, provider: str) -> dict[str, Any]:
    return {
        "run_id": result.run_id,
        "seed": result.seed,
        "policy": policy_id,
        "provider": provider,
        "wanted": result.wanted,
        "candidates": result.candidates,
        "passed": result.passed,
        "exported": result.exported,
        "verdict_grades": result.verdict_grades,
        "times_s": result.times,
        "bundle": str(result.bundle) if result.bundle else None,
        "audit_log": str(result.audit_log),
        "quarantine": str(result.quarantine) if result.quarantine else None,
        "memorization": result.memorization(),
        "exit_code": int(result.exit_code),
    }


def _print_summary(result: Any, policy_id: str, wall: float, index_dir: Path) -> None:
    from gate.values import Grade, Verdict

    click.echo(
        f"run {result.run_id} (policy {policy_id}, seed {result.seed}): "
        f"{result.candidates} candidates generated, {result.passed} passed, "
        f"{result.count(Verdict.FLAG)} flagged, {result.count(Verdict.REJECT)} rejected"
    )
    for verdict in (Verdict.FLAG, Verdict.REJECT):
        per = ", ".join(f"{g.value} {result.count(verdict, g)}" for g in Grade if result.count(verdict, g))
        if per:
            click.echo(f"  {verdict.value} by grade: {per}")
    click.echo(
        "time per stage: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in result.times.items())
        + f"; total {wall:.1f} s"
    )
    click.echo(
        f"memorization: {result.copy_share:.2%} of candidates rejected as copies; "
        f"{result.patients_copied}/{result.training_patients} training patients "
        f"({result.patients_copied_share:.2%}) copied by some candidate"
    )
    if result.bundle is not None:
        click.echo(f"bundle: {result.bundle} ({result.exported} samples); audit log: {result.audit_log}")
    else:
        click.echo(f"no candidate passed: no bundle written; audit log: {result.audit_log}")
    if result.quarantine is not None and result.candidates > result.exported:
        from gate.index import DEFAULT_INDEX_DIR
        from gate.report import DEMO_KEY_FILE

        shipped = index_dir.resolve() == DEFAULT_INDEX_DIR.resolve()
        key = DEMO_KEY_FILE if shipped else "INDEX_KEY_FILE"
        released = f" --candidates {result.bundle / 'samples'}" if result.bundle is not None else ""
        click.echo(
            f"not exported, kept for review (internal): {result.quarantine}; report: gate audit report "
            f"{result.run_id} --log {result.audit_log} --candidates {result.quarantine}{released} "
            f"--index {index_dir} --data TRAINING_DIR --id-key-file {key} --out REPORT_DIR "
            "(--id-key-file: the pseudonymisation key the index was built with"
            + ("; this is the shipped index's demo key)" if shipped else ")")
        )
    if result.exported < result.wanted:
        click.echo(
            f"gate: only {result.exported} of {result.wanted} wanted samples passed within "
            f"{result.candidates} candidates; raise --max-candidates or use a better generator",
            err=True,
        )
