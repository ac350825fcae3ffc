"""Where every expert's bytes live on disk, and how to read them with O_DIRECT.

Interface for the executor:

    store = ExpertStore.open(PATH)        # a .gguf file, or a dir written by `mer experts pack`
    store.shape, store.n_layers, store.n_experts, store.bytes_per_expert
    store.expert_dtype                    Q4_0 (the engine's kernel), Q8_0, F16 or F32
    store.data_path                       # the file every read_plan offset refers to
    store.read_plan(layer, expert) -> list[Read(offset, length, buf_offset)]
        aligned reads (offset, length multiples of 4096) that together cover the
        expert; read number i goes to buffer[buf_offset : buf_offset + length]
        (reads are laid back to back from 0).
    store.bytes_needed  (== store.slot_bytes)   buffer size that fits any expert's plan
    store.views(buffer, layer, expert) -> (gate, up, down)
        zero-copy uint8 arrays over `buffer` holding the expert's bytes, ready for
        the FFN of its type (`mer.engine.expert_types.make_expert_ffn`).
    store.expert_ranges(layer, expert)  the three exact byte ranges (gate, up, down)
    store.aligned_span(layer, expert)   the aligned reads as ByteRange(start, length)
    store.dense_ranges(layer)           attn_{q,k,v,output} ranges when the file has them

Layouts. In a stacked GGUF (`blk.N.ffn_gate_exps.weight`, expert outermost)
the gate, up and down of one expert sit in three different tensors, so an
expert is three aligned reads. In a per-expert GGUF (`blk.N.ffn_gate.E.weight`)
they are usually adjacent and the plan merges them into one read. A packed dir
holds one 4 KiB-aligned slot per expert (gate|up|down), one read each.

The GGUF is opened with gguf's reader for the metadata and tensor table only;
tensor data is never touched here (the reader memory-maps, nothing is read).
Bad files raise one BadInput each: not GGUF, unparsable header, truncated data,
missing expert tensors, an expert type the engine cannot compute (anything
but q4_0, q8_0, f16, f32) or a mix of types, inconsistent shapes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from mer import validate
from mer.errors import BadInput
from mer.guard import check_input, load_json_input
from mer.shapes import ALIGN, SHAPES, ModelShape

U8 = npt.NDArray[np.uint8]
KINDS = ("gate", "up", "down")
#: Expert tensor types the engine streams and computes (q4_0 is the fast path).
EXPERT_DTYPES = ("Q4_0", "Q8_0", "F16", "F32")
DENSE_KINDS = ("q", "k", "v", "output")
PACK_FORMAT = "mer-packed-experts"
PACK_VERSION = 1
PACK_DATA = "experts.bin"
PACK_DENSE = "dense.bin"
PACK_MANIFEST = "manifest.json"
GGUF_MAGIC = b"GGUF"

_STACKED = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
_PER_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
_ATTN = re.compile(r"^blk\.(\d+)\.attn_(q|k|v|output)\.weight$")


class ByteRange(NamedTuple):
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


class Read(NamedTuple):
    """One aligned read: file offset, length, and where it lands in the slot buffer."""

    offset: int
    length: int
    buf_offset: int


def align_down(n: int, a: int = ALIGN) -> int:
    return n - n % a


def align_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def plan_reads(ranges: list[ByteRange], align: int = ALIGN) -> list[Read]:
    """Widen ranges to `align` and merge those whose aligned spans touch or overlap."""
    spans: list[list[int]] = []
    for r in sorted(ranges):
        start, end = align_down(r.offset, align), align_up(r.end, align)
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    reads, pos = [], 0
    for start, end in spans:
        reads.append(Read(start, end - start, pos))
        pos += end - start
    return reads


def typical_read_ranges(store: Any) -> tuple[int, ...]:
    """The range lengths of one expert read (the most common plan of the file): what the
    simulator needs to chunk a read as the engine does (`SimOptions.read_ranges`)."""
    from collections import Counter

    plans: Counter[tuple[int, ...]] = Counter()
    for layer in range(store.n_layers):
        for expert in range(store.n_experts):
            plans[tuple(int(r.length) for r in store.read_plan(layer, expert))] += 1
    return plans.most_common(1)[0][0]


def read_bytes_by_key(store: Any) -> tuple[int, ...]:
    """Bytes of each global key's read plan (layer * n_experts + expert)."""
    return tuple(
        sum(int(r.length) for r in store.read_plan(layer, expert))
        for layer in range(store.n_layers)
        for expert in range(store.n_experts)
    )


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the GGUF table: ggml dims (ne[0] first) and absolute data offset."""

    name: str
    dtype: str  # GGMLQuantizationType name, or "type <n>" when unknown to gguf
    ne: tuple[int, ...]
    offset: int
    n_bytes: int


class _TableReader(GGUFReader):
    """gguf's reader, minus the per-tensor data views.

    GGUFReader slices each tensor's data out of its memory map while parsing, and
    fails with a reshape error on a truncated file before we could say which
    tensor is cut. Overriding its tensor-building step keeps gguf's parsing of
    header, metadata and tensor infos, and leaves the data checks to us.
    """

    table: list[TensorInfo]

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        table: list[TensorInfo] = []
        seen: set[str] = set()
        for f in fields:
            _name_len, name_data, _n_dims, dims, raw_dtype, offset_tensor = f.parts
            name = bytes(name_data).decode("utf-8", "replace")
            if name in seen:
                raise ValueError(f"duplicated tensor name {name}")
            seen.add(name)
            ne = tuple(int(d) for d in dims)
            n_elems = int(np.prod(ne, dtype=np.int64)) if ne else 1
            code = int(raw_dtype[0])
            try:
                qt = GGMLQuantizationType(code)
                block, size = GGML_QUANT_SIZES[qt]
                dtype, n_bytes = qt.name, n_elems * size // block
            except (ValueError, KeyError):
                dtype, n_bytes = f"type {code}", 0
            table.append(TensorInfo(name, dtype, ne, int(start_offs + offset_tensor[0]), n_bytes))
        self.table = table
        self.tensors = []


def _field_value(reader: GGUFReader, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None or not f.data:
        return None
    part = f.parts[f.data[0]]
    if f.types and f.types[0].name == "STRING":
        return bytes(part).decode("utf-8", "replace")
    return part[0].item() if hasattr(part[0], "item") else part[0]


@dataclass
class _Layout:
    ranges: np.ndarray  # int64 (n_layers, n_experts, 3, 2): offset, length of gate/up/down
    dense: dict[int, dict[str, ByteRange]] = field(default_factory=dict)


def _match_shape(
    n_layers: int,
    n_experts: int,
    d_model: int,
    d_ff: int,
    top_k: int,
    heads: Any,
    kv: Any,
    hint: Any,
) -> ModelShape:
    geom = (n_layers, n_experts, d_model, d_ff)
    if isinstance(hint, str) and hint in SHAPES:
        s = SHAPES[hint]
        if (s.n_layers, s.n_experts, s.d_model, s.d_ff) == geom:
            return s
    for s in SHAPES.values():
        if (s.n_layers, s.n_experts, s.d_model, s.d_ff) == geom and s.top_k == top_k:
            return s
    return ModelShape(
        f"gguf-{n_layers}x{n_experts}-d{d_model}-ff{d_ff}",
        n_layers,
        n_experts,
        top_k,
        d_model,
        d_ff,
        n_heads=int(heads) if heads else 32,
        n_kv_heads=int(kv) if kv else 8,
        description="read from a GGUF file",
    )


def _first(names: list[str], n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


class ExpertStore:
    """Byte ranges of every expert in a GGUF file or a packed dir (see module docstring)."""

    alignment = ALIGN

    def __init__(
        self,
        path: Path,
        data_path: Path,
        kind: str,
        layout: str,
        shape: ModelShape,
        ranges: np.ndarray,
        file_size: int,
        dense: dict[int, dict[str, ByteRange]] | None = None,
        dense_path: Path | None = None,
        extra: dict[str, Any] | None = None,
        expert_dtype: str = "Q4_0",
    ) -> None:
        self.expert_dtype = expert_dtype
        self.path = path
        self.data_path = data_path
        self.kind = kind  # "gguf" | "packed"
        self.layout = layout  # "stacked" | "per-expert" | "packed"
        self.shape = shape
        self.n_layers = shape.n_layers
        self.n_experts = shape.n_experts
        self.file_size = file_size
        self._ranges = ranges
        self._dense = dense or {}
        self.dense_path = dense_path if dense_path is not None else data_path
        self.extra = extra or {}
        self._plans: list[list[Read]] = []
        self._pos: list[tuple[int, int, int]] = []
        for layer in range(self.n_layers):
            for expert in range(self.n_experts):
                rs = self.expert_ranges(layer, expert)
                plan = plan_reads(list(rs))
                self._plans.append(plan)
                self._pos.append(tuple(_buffer_pos(plan, r) for r in rs))  # type: ignore[arg-type]
        self.bytes_needed = max(sum(r.length for r in p) for p in self._plans)

    # ---- opening ---------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ExpertStore:
        p = Path(path)
        if not os.path.lexists(p):
            raise BadInput(f"expert file {p}: no such file; create one with `mer experts synth`.")
        check_input(p, "expert file", directory_ok=True)
        if p.is_dir():
            return _open_packed(p)
        return _open_gguf(p)

    # ---- the executor's interface ----------------------------------------------------
    @property
    def bytes_per_expert(self) -> int:
        """Bytes of gate + up + down of one expert in the file's type."""
        return int(self._ranges[0, 0, :, 1].sum())

    @property
    def slot_bytes(self) -> int:
        """Alias of bytes_needed: the slot buffer size the executor allocates."""
        return self.bytes_needed

    @property
    def dense_present(self) -> bool:
        return bool(self._dense) and len(self._dense) == self.n_layers

    def _key(self, layer: int, expert: int) -> int:
        if not (0 <= layer < self.n_layers and 0 <= expert < self.n_experts):
            raise IndexError(
                f"expert ({layer}, {expert}) outside {self.n_layers} layers x {self.n_experts}"
            )
        return layer * self.n_experts + expert

    def expert_ranges(self, layer: int, expert: int) -> tuple[ByteRange, ByteRange, ByteRange]:
        """Exact (offset, length) of gate, up and down in `data_path`."""
        self._key(layer, expert)
        r = self._ranges[layer, expert]
        return (
            ByteRange(int(r[0, 0]), int(r[0, 1])),
            ByteRange(int(r[1, 0]), int(r[1, 1])),
            ByteRange(int(r[2, 0]), int(r[2, 1])),
        )

    def read_plan(self, layer: int, expert: int) -> list[Read]:
        return self._plans[self._key(layer, expert)]

    def aligned_span(self, layer: int, expert: int) -> list[ByteRange]:
        """The aligned reads covering the expert: one when its ranges are contiguous."""
        return [ByteRange(r.offset, r.length) for r in self.read_plan(layer, expert)]

    def views(self, buffer: Any, layer: int, expert: int) -> tuple[U8, U8, U8]:
        """gate, up, down bytes inside `buffer` filled by read_plan (no copy)."""
        key = self._key(layer, expert)
        buf = _u8(buffer)
        need = sum(r.length for r in self._plans[key])
        if buf.size < need:
            raise ValueError(f"buffer of {buf.size} bytes is smaller than the read plan ({need})")
        lengths = self._ranges[layer, expert, :, 1]
        return tuple(  # type: ignore[return-value]
            buf[pos : pos + int(n)] for pos, n in zip(self._pos[key], lengths, strict=True)
        )

    def valid_length(self, offset: int, length: int) -> int:
        """Bytes a read can return before EOF (a plan never ends past EOF in our files)."""
        return max(0, min(length, self.file_size - offset))

    # ---- dense (attention) tensors -----------------------------------------------------
    def dense_ranges(self, layer: int) -> dict[str, ByteRange]:
        """attn_q/k/v/output byte ranges in `dense_path`, empty when the file has none."""
        return dict(self._dense.get(layer, {}))

    def dense_read_plan(self, layer: int) -> list[Read]:
        return plan_reads(list(self.dense_ranges(layer).values()))

    def dense_views(self, buffer: Any, layer: int) -> dict[str, U8]:
        ranges = self.dense_ranges(layer)
        plan = plan_reads(list(ranges.values()))
        buf = _u8(buffer)
        return {
            k: buf[_buffer_pos(plan, r) : _buffer_pos(plan, r) + r.length]
            for k, r in ranges.items()
        }

    # ---- description -------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        plans = [len(p) for p in self._plans]
        return {
            "path": str(self.path),
            "kind": self.kind,
            "layout": self.layout,
            "shape": self.shape.to_dict(),
            "n_layers": self.n_layers,
            "n_experts": self.n_experts,
            "bytes_per_expert": self.bytes_per_expert,
            "expert_dtype": self.expert_dtype,
            "alignment": self.alignment,
            "bytes_needed": self.bytes_needed,
            "reads_per_expert": max(plans),
            "read_amplification": round(
                sum(sum(r.length for r in p) for p in self._plans)
                / (self.bytes_per_expert * len(self._plans)),
                4,
            ),
            "file_size": self.file_size,
            "dense_present": self.dense_present,
            "dense_bytes_per_layer": sum(r.length for r in self._dense.get(0, {}).values()),
            **self.extra,
        }


def _u8(buffer: Any) -> U8:
    if isinstance(buffer, np.ndarray):
        a = buffer.reshape(-1)
        return a if a.dtype == np.uint8 else a.view(np.uint8)
    return np.frombuffer(buffer, dtype=np.uint8)


def _buffer_pos(plan: list[Read], r: ByteRange) -> int:
    for rd in plan:
        if rd.offset <= r.offset and r.end <= rd.offset + rd.length:
            return rd.buf_offset + r.offset - rd.offset
    raise AssertionError(f"range {r} not covered by plan {plan}")  # plan_reads covers all


# ---- GGUF ------------------------------------------------------------------------------
def _open_gguf(p: Path) -> ExpertStore:
    size = p.stat().st_size
    try:
        with open(p, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise BadInput(f"expert file {p}: cannot be read ({exc.strerror}).") from None
    if magic != GGUF_MAGIC:
        raise BadInput(
            f"{p} is not a GGUF file (starts with {magic!r}, expected b'GGUF'); "
            "give a .gguf model file or a dir made by `mer experts pack`."
        )
    try:
        reader = _TableReader(str(p))
    except Exception as exc:
        raise BadInput(
            f"{p}: cannot parse the GGUF header ({exc}); the file is corrupt or truncated, "
            "re-download or re-create it."
        ) from None
    table = reader.table
    if not table:
        raise BadInput(f"{p}: GGUF file holds no tensors; expected Mixtral expert tensors.")
    last = max(table, key=lambda t: t.offset + t.n_bytes)
    if last.offset + last.n_bytes > size:
        raise BadInput(
            f"{p} is truncated: tensor {last.name} ends at byte {last.offset + last.n_bytes} "
            f"but the file has {size} bytes; re-download or re-create it."
        )
    by_name = {t.name: t for t in table}
    arch = _field_value(reader, "general.architecture") or "llama"
    meta_layers = _field_value(reader, f"{arch}.block_count")
    meta_experts = _field_value(reader, f"{arch}.expert_count")
    top_k = _field_value(reader, f"{arch}.expert_used_count") or 2

    stacked = {(int(m[1]), m[2]): t for t in table if (m := _STACKED.match(t.name))}
    per_exp = {(int(m[1]), m[2], int(m[3])): t for t in table if (m := _PER_EXPERT.match(t.name))}
    if not stacked and not per_exp:
        raise BadInput(
            f"{p}: no expert tensors found (expected blk.N.ffn_gate_exps.weight or "
            "blk.N.ffn_gate.E.weight); is this a Mixture-of-Experts model?"
        )
    if stacked and per_exp:
        raise BadInput(
            f"{p}: holds both stacked and per-expert expert tensors; cannot tell which to use."
        )
    layout = "stacked" if stacked else "per-expert"
    for key, value, hi in (
        (f"{arch}.block_count", meta_layers, 1 << 15),
        (f"{arch}.expert_count", meta_experts, 1 << 15),
        (f"{arch}.expert_used_count", top_k, 127),
    ):
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, (int, np.integer))
            or not 1 <= value <= hi
        ):
            raise BadInput(f"{p}: GGUF metadata {key} is {value!r}, expected an integer 1..{hi}.")
    layers_seen = [k[0] for k in (stacked or per_exp)]
    n_layers = int(meta_layers) if meta_layers else max(layers_seen) + 1
    if layout == "stacked":
        ref = stacked.get((0, "gate")) or next(iter(stacked.values()))
        n_experts = int(meta_experts) if meta_experts else (ref.ne[2] if len(ref.ne) > 2 else 0)
        need = {(L, k): f"blk.{L}.ffn_{k}_exps.weight" for L in range(n_layers) for k in KINDS}
        missing = [n for key, n in need.items() if key not in stacked]
    else:
        ref = per_exp.get((0, "gate", 0)) or next(iter(per_exp.values()))
        n_experts = int(meta_experts) if meta_experts else max(k[2] for k in per_exp) + 1
        need2 = {
            (L, k, e): f"blk.{L}.ffn_{k}.{e}.weight"
            for L in range(n_layers)
            for e in range(n_experts)
            for k in KINDS
        }
        missing = [n for key, n in need2.items() if key not in per_exp]
    if missing:
        raise BadInput(
            f"{p}: missing expert tensors {_first(missing)} ({len(missing)} missing, "
            f"{n_layers} layers x {n_experts} experts expected); the file is incomplete."
        )
    experts = list(stacked.values()) if stacked else list(per_exp.values())
    for t in sorted(experts, key=lambda t: t.offset):
        if t.dtype not in EXPERT_DTYPES:
            raise BadInput(
                f"{p}: expert tensor {t.name} is {t.dtype}; the engine streams experts in "
                f"{', '.join(d.lower() for d in EXPERT_DTYPES)} only (q4_0 is the fast one). "
                "Use a Q4_0 file (llama-quantize FILE OUT.gguf Q4_0)."
            )
    dtypes = sorted({t.dtype for t in experts})
    if len(dtypes) > 1:
        raise BadInput(
            f"{p}: expert tensors mix types ({', '.join(dtypes)}); the engine needs one type for "
            "all experts. Use a Q4_0 file (llama-quantize FILE OUT.gguf Q4_0)."
        )
    expert_dtype = dtypes[0]
    if len(ref.ne) < 2:
        raise BadInput(
            f"{p}: inconsistent shapes: {ref.name} has ne {list(ref.ne)}, expected 2+ dims."
        )
    d_model, d_ff = ref.ne[0], ref.ne[1]
    if ref.name.split(".")[2].startswith("ffn_down"):
        d_model, d_ff = d_ff, d_model
    for t in experts:
        kind = t.name.split(".")[2].removeprefix("ffn_").removesuffix("_exps")
        want: tuple[int, ...] = (d_ff, d_model) if kind == "down" else (d_model, d_ff)
        if layout == "stacked":
            want = (*want, n_experts)
        if t.ne != want:
            raise BadInput(
                f"{p}: inconsistent shapes: {t.name} has ne {list(t.ne)} but {ref.name} implies "
                f"{list(want)} (d_model {d_model}, d_ff {d_ff}, {n_experts} experts)."
            )
    if d_model % 32 or d_ff % 32:
        raise BadInput(
            f"{p}: inconsistent shapes: d_model {d_model} and d_ff {d_ff} must be multiples of 32."
        )
    shape = _match_shape(
        n_layers,
        n_experts,
        d_model,
        d_ff,
        int(top_k),
        _field_value(reader, f"{arch}.attention.head_count"),
        _field_value(reader, f"{arch}.attention.head_count_kv"),
        _field_value(reader, "mer.shape"),
    )
    ranges = np.zeros((n_layers, n_experts, 3, 2), dtype=np.int64)
    for L in range(n_layers):
        for i, k in enumerate(KINDS):
            if layout == "stacked":
                t = stacked[(L, k)]
                per_matrix = t.n_bytes // n_experts
                ranges[L, :, i, 0] = t.offset + np.arange(n_experts) * per_matrix
                ranges[L, :, i, 1] = per_matrix
            else:
                for e in range(n_experts):
                    t = per_exp[(L, k, e)]
                    ranges[L, e, i] = (t.offset, t.n_bytes)
    dense: dict[int, dict[str, ByteRange]] = {}
    for t in table:
        m = _ATTN.match(t.name)
        if m and t.dtype == "Q4_0":
            dense.setdefault(int(m[1]), {})[m[2]] = ByteRange(t.offset, t.n_bytes)
    dense = {
        L: {k: d[k] for k in DENSE_KINDS}
        for L, d in dense.items()
        if all(k in d for k in DENSE_KINDS)
    }
    del reader
    return ExpertStore(
        p,
        p,
        "gguf",
        layout,
        shape,
        ranges,
        size,
        dense,
        extra={"arch": arch, "tensors": len(by_name)},
        expert_dtype=expert_dtype,
    )


# ---- packed dir ------------------------------------------------------------------------
def _shape_from_manifest(where: str, s: Any) -> ModelShape:
    s = validate.obj(where, "shape", s, optional=False)
    for k in ("name", "n_layers", "n_experts", "top_k", "d_model", "d_ff"):
        if k not in s:
            raise BadInput(f"{where}: field shape.{k} is missing; re-run `mer experts pack`.")
    n_layers = validate.integer(where, "shape.n_layers", s["n_layers"], lo=1, hi=1 << 15)
    n_experts = validate.integer(where, "shape.n_experts", s["n_experts"], lo=1, hi=1 << 15)
    top_k = validate.integer(where, "shape.top_k", s["top_k"], lo=1, hi=n_experts)
    d_model = validate.integer(where, "shape.d_model", s["d_model"], lo=32, hi=1 << 20)
    d_ff = validate.integer(where, "shape.d_ff", s["d_ff"], lo=32, hi=1 << 20)
    if d_model % 32 or d_ff % 32:
        raise BadInput(f"{where}: shape d_model {d_model} and d_ff {d_ff} must be multiples of 32.")
    return ModelShape(
        validate.text(where, "shape.name", s["name"], limit=256),
        n_layers,
        n_experts,
        top_k,
        d_model,
        d_ff,
        n_heads=validate.integer(where, "shape.n_heads", s.get("n_heads", 32), lo=1, hi=1 << 12),
        n_kv_heads=validate.integer(
            where, "shape.n_kv_heads", s.get("n_kv_heads", 8), lo=1, hi=1 << 12
        ),
        description=str(s.get("description") or ""),
    )


def _open_packed(d: Path) -> ExpertStore:
    """A packed dir; every manifest field is checked against the shape and the file sizes."""
    mpath = d / PACK_MANIFEST
    if not mpath.exists():
        raise BadInput(
            f"{d} is a directory without {PACK_MANIFEST}; make one with `mer experts pack`."
        )
    where = str(mpath)
    m = load_json_input(mpath, "pack manifest")
    if not isinstance(m, dict):
        raise BadInput(f"{where}: not a pack manifest (a JSON object); re-run `mer experts pack`.")
    if m.get("format") != PACK_FORMAT:
        raise BadInput(
            f"{where}: not a valid pack manifest (format is {m.get('format')!r}, expected "
            f"{PACK_FORMAT!r}); re-run `mer experts pack`."
        )
    version = m.get("version", PACK_VERSION)
    if version != PACK_VERSION:
        raise BadInput(
            f"{where}: pack version {version!r}, this mer reads {PACK_VERSION}; re-run "
            "`mer experts pack`."
        )
    for key in ("shape", "slot_bytes", "slot_offsets", "matrix_bytes"):
        if key not in m:
            raise BadInput(
                f"{where}: not a valid pack manifest (no {key!r}); re-run `mer experts pack`."
            )
    shape = _shape_from_manifest(where, m["shape"])
    slot = validate.integer(where, "slot_bytes", m["slot_bytes"], lo=ALIGN, hi=1 << 36)
    if slot % ALIGN:
        raise BadInput(f"{where}: slot_bytes {slot} is not a multiple of {ALIGN}.")
    mb = validate.obj(where, "matrix_bytes", m["matrix_bytes"], optional=False)
    dtype = str(m.get("expert_dtype", "Q4_0"))
    if dtype not in EXPERT_DTYPES:
        raise BadInput(f"{where}: expert_dtype {dtype!r} unknown; re-run `mer experts pack`.")
    block, size_b = GGML_QUANT_SIZES[GGMLQuantizationType[dtype]]
    per_matrix = shape.d_model * shape.d_ff // block * size_b
    lens = []
    for k in KINDS:
        if k not in mb:
            raise BadInput(f"{where}: matrix_bytes has no {k!r}; re-run `mer experts pack`.")
        n = validate.integer(where, f"matrix_bytes.{k}", mb[k], lo=1, hi=1 << 36)
        if n != per_matrix:
            raise BadInput(
                f"{where}: matrix_bytes.{k} is {n:,}, but shape {shape.name} "
                f"({shape.d_model}x{shape.d_ff} {dtype.lower()}) has {per_matrix:,} bytes per matrix."
            )
        lens.append(n)
    if sum(lens) > slot:
        raise BadInput(
            f"{where}: an expert ({sum(lens):,} bytes) does not fit slot_bytes {slot:,}."
        )
    raw_offs = m["slot_offsets"]
    n_slots = shape.n_layers * shape.n_experts
    if not isinstance(raw_offs, list) or len(raw_offs) != n_slots:
        got = len(raw_offs) if isinstance(raw_offs, list) else type(raw_offs).__name__
        raise BadInput(
            f"{where}: slot_offsets must list {n_slots} offsets ({shape.n_layers} layers x "
            f"{shape.n_experts} experts), got {got}."
        )
    for i, v in enumerate(raw_offs):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v % ALIGN:
            raise BadInput(
                f"{where}: slot_offsets[{i}] must be a non-negative multiple of {ALIGN}, got {v!r}."
            )
    offs = np.asarray(raw_offs, dtype=np.int64).reshape(shape.n_layers, shape.n_experts)
    data = d / PACK_DATA
    if not data.exists():
        raise BadInput(f"{data}: missing; the pack is incomplete, re-run `mer experts pack`.")
    check_input(data, "packed experts")
    size = data.stat().st_size
    need = int(offs.max()) + slot
    if size < need:
        raise BadInput(
            f"{data} is truncated: the manifest needs {need} bytes, the file has {size}; "
            "re-run `mer experts pack`."
        )
    ranges = np.zeros((shape.n_layers, shape.n_experts, 3, 2), dtype=np.int64)
    pos = 0
    for i, n in enumerate(lens):
        ranges[:, :, i, 0] = offs + pos
        ranges[:, :, i, 1] = n
        pos += n
    dense: dict[int, dict[str, ByteRange]] = {}
    raw_dense = validate.obj(where, "dense", m.get("dense"))
    dense_path = d / PACK_DENSE
    parsed: dict[int, dict[str, list[Any]]] = {}
    for key, entry in raw_dense.items():
        try:
            layer = int(key)
        except ValueError:
            raise BadInput(f"{where}: dense key {key!r} is not a layer number.") from None
        if not 0 <= layer < shape.n_layers:
            raise BadInput(f"{where}: dense layer {layer} outside 0..{shape.n_layers - 1}.")
        entry = validate.obj(where, f"dense.{key}", entry, optional=False)
        for k in DENSE_KINDS:
            v = entry.get(k)
            if not (isinstance(v, list) and len(v) == 2):
                raise BadInput(f"{where}: dense.{key}.{k} must be [offset, length], got {v!r}.")
        parsed[layer] = entry
    if parsed:
        if not dense_path.exists():
            raise BadInput(f"{dense_path}: missing but the manifest lists dense tensors.")
        check_input(dense_path, "packed dense tensors")
        dsize = dense_path.stat().st_size
        for layer, entry in parsed.items():
            rs = {}
            for k in DENSE_KINDS:
                v = entry[k]
                off = validate.integer(where, f"dense.{layer}.{k}[0]", v[0], lo=0, hi=dsize)
                n = validate.integer(where, f"dense.{layer}.{k}[1]", v[1], lo=1, hi=dsize - off)
                rs[k] = ByteRange(off, n)
            dense[layer] = rs
    extra = {"slot_bytes_manifest": slot, "source": validate.obj(where, "source", m.get("source"))}
    return ExpertStore(
        d,
        data,
        "packed",
        "packed",
        shape,
        ranges,
        size,
        dense,
        dense_path,
        extra=extra,
        expert_dtype=dtype,
    )
