"""``gate keys``: the site key pair that signs bundles and audit heads (:mod:`gate.signing`)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def keys() -> None:
    """The site key pair (ed25519): signs bundle manifests and audit heads."""


@keys.command("init")
@click.option(
    "--dir",
    "key_folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to write site.key (mode 0600) and site.pub; default $GATE_KEY_DIR or ~/.config/gate.",
)
@click.option("--force", is_flag=True, help="Replace an existing key pair.")
def init(key_folder: Path | None, force: bool) -> None:
    """Make the site key pair; the private key never goes into a bundle or a repository."""
    from gate.signing import init_keys, key_dir

    private, public = init_keys(key_folder or key_dir(), force=force)
    click.echo(f"private key {private} (mode 600; keep it on this machine)")
    click.echo(f"public key {public} (give it to verifiers: --public-key {public})")


@keys.command("show")
@click.option("--dir", "key_folder", type=click.Path(file_okay=False, path_type=Path), default=None)
def show(key_folder: Path | None) -> None:
    """Print the public key's path and id."""
    from gate.signing import PUBLIC_KEY_FILE, key_dir, key_id, load_public_key

    public = (key_folder or key_dir()) / PUBLIC_KEY_FILE
    click.echo(f"{public} key id {key_id(load_public_key(public))}")
