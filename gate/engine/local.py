"""The local engine: every stage in this process, as gate has always run (no Ray import)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gate.digest import sha256_voxels
from gate.engine import Item
from gate.errors import InputError
from gate.index import Probe, embed_volumes
from gate.index_manifest import EmbeddingModel
from gate.poses import IDENTITY_ONLY, PoseSet
from gate.shards import Searcher, load_index, process_map
from gate.values import Volume
from gate.verify import Verifier, View
from gate.volume import ReadOptions


class LocalEngine:
    """Read, embed and search in this process; shard builds in local processes."""

    def __init__(self, encoder: EmbeddingModel) -> None:
        self.encoder = encoder
        self.provider = str(getattr(encoder, "provider", "unknown"))
        self.mapper = process_map

    def read(self, paths: Sequence[Path], options: ReadOptions) -> tuple[list[Item], list[InputError]]:
        """Discover and read with :func:`gate.cli.index.read_all`."""
        from gate.cli.index import read_all

        volumes, _, errors = read_all(list(paths), options)
        return [Item(v.source, sha256_voxels(v.data), v) for v in volumes], errors

    def embed(self, items: Sequence[Item]) -> list[Probe]:
        """Preprocess and embed the items' volumes (identity pose)."""
        return embed_volumes([it.ref for it in items], self.encoder, IDENTITY_ONLY)

    def embed_volumes(self, volumes: Sequence[Volume], poses: PoseSet) -> list[Probe]:
        """:func:`gate.index.embed_volumes` in this process."""
        return embed_volumes(volumes, self.encoder, poses)

    def open_index(self, index_dir: Path) -> Searcher:
        """:func:`gate.shards.load_index`."""
        return load_index(index_dir, self.encoder)

    def views(self, items: Sequence[Item], verifier: Verifier) -> list[View]:
        """Each item's volume with the verifier's margin (:meth:`gate.verify.Verifier.view`)."""
        return [verifier.view(it.ref) for it in items]

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
