"""`mer experts pack`: repack experts into 4 KiB-aligned slots, one contiguous read each.

A stacked GGUF spreads an expert over three tensors (three reads, each widened
to 4 KiB); the packed file puts gate|up|down of each expert back to back in a
slot of `shape.slot_bytes`, slot i = layer * n_experts + expert, so one O_DIRECT
read of exactly one slot fetches the expert. Dense attention tensors, when the
source has them, go to dense.bin (one aligned slot per layer, q|k|v|output).

manifest.json records the shape, slot size, every slot offset, the per-matrix
sizes and the source (path, size, mtime and the sha256 of the payload bytes,
which are all the bytes copied, in slot order) so a pack can be traced back
to the file it came from.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mer.atomic import atomic_path, write_json_atomic
from mer.engine.store import (
    DENSE_KINDS,
    KINDS,
    PACK_DATA,
    PACK_DENSE,
    PACK_FORMAT,
    PACK_MANIFEST,
    PACK_VERSION,
    ExpertStore,
    align_up,
)
from mer.errors import BadInput
from mer.shapes import ALIGN


@dataclass(frozen=True)
class PackResult:
    out_dir: str
    slots: int
    slot_bytes: int
    data_bytes: int
    dense_layers: int
    payload_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _copy(src_fd: int, offset: int, length: int, out: Any, digest: Any) -> None:
    data = os.pread(src_fd, length, offset)
    if len(data) != length:
        raise BadInput(
            f"short read at offset {offset} of the source ({len(data)} of {length} bytes)."
        )
    digest.update(data)
    out.write(data)


def pack_experts(
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    progress: Callable[[int, int], None] | None = None,
) -> PackResult:
    store = ExpertStore.open(src)
    if store.kind != "gguf":
        raise BadInput(f"{src} is already a packed dir; pack takes a .gguf file.")
    shape = store.shape
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BadInput(f"-o {out}: exists and is not a directory.")
    out.mkdir(parents=True, exist_ok=True)
    slot = align_up(store.bytes_per_expert, ALIGN)
    n = store.n_layers * store.n_experts
    digest = hashlib.sha256()
    offsets: list[int] = []
    fd = os.open(store.data_path, os.O_RDONLY)
    try:
        with atomic_path(out / PACK_DATA) as tmp, open(tmp, "wb") as fh:
            for layer in range(store.n_layers):
                for expert in range(store.n_experts):
                    offsets.append(fh.tell())
                    for r in store.expert_ranges(layer, expert):
                        _copy(fd, r.offset, r.length, fh, digest)
                    fh.write(b"\0" * (slot - store.bytes_per_expert))
                    if progress is not None:
                        progress(len(offsets), n)
        dense_manifest: dict[str, dict[str, list[int]]] = {}
        if store.dense_present:
            with atomic_path(out / PACK_DENSE) as tmp, open(tmp, "wb") as fh:
                for layer in range(store.n_layers):
                    entry: dict[str, list[int]] = {}
                    start = fh.tell()
                    for k in DENSE_KINDS:
                        r = store.dense_ranges(layer)[k]
                        entry[k] = [fh.tell(), r.length]
                        _copy(fd, r.offset, r.length, fh, digest)
                    fh.write(b"\0" * (align_up(fh.tell() - start, ALIGN) - (fh.tell() - start)))
                    dense_manifest[str(layer)] = entry
    finally:
        os.close(fd)
    src_path = Path(src)
    st = src_path.stat()
    lens = {k: r.length for k, r in zip(KINDS, store.expert_ranges(0, 0), strict=True)}
    manifest = {
        "format": PACK_FORMAT,
        "version": PACK_VERSION,
        "shape": shape.to_dict(),
        "alignment": ALIGN,
        "slot_bytes": slot,
        "bytes_per_expert": store.bytes_per_expert,
        "expert_dtype": store.expert_dtype,
        "matrix_bytes": lens,
        "order": "slot = layer * n_experts + expert; gate|up|down within a slot",
        "slot_offsets": offsets,
        "data_file": PACK_DATA,
        "dense_file": PACK_DENSE if dense_manifest else None,
        "dense": dense_manifest,
        "source": {
            "path": str(src_path.resolve()),
            "layout": store.layout,
            "size": st.st_size,
            "mtime": int(st.st_mtime),
            "payload_sha256": digest.hexdigest(),
        },
    }
    write_json_atomic(out / PACK_MANIFEST, manifest)
    return PackResult(
        out_dir=str(out),
        slots=n,
        slot_bytes=slot,
        data_bytes=n * slot,
        dense_layers=len(dense_manifest),
        payload_sha256=digest.hexdigest(),
    )
