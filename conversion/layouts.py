"""The conversion engine: applies the layout tables of `rules.py` to a source and plans the destination.

Conversion goes source layout -> canonical (moe_mtp) names -> destination layout, without materializing the middle:

1. `layout_groups` lists, for a config, every tensor a layout stores and the canonical tensors it holds.
2. `resolve_source` matches a source's tensors against that list (names, shapes, FP8 scales) and tells, for every
   canonical tensor, where its values are: a `Ref` (source tensor, element offset, dtype, FP8 scale).
3. `plan_outputs` lists every destination tensor (name, dtype, shape) with a producer that yields its data in
   chunks: raw byte ranges when nothing changes, otherwise row chunks (cast, FP8 (de)quantization, stacking).

The same plan feeds the streaming folder writer (`convert.py`) and the in-memory `convert_state_dict`.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from . import fp8
from .errors import ConversionError
from .rules import LAYOUTS, Copy, Ignore, Layout, Omit, Rename, Stack, concrete_rules
from .safetensors_io import DTYPE_NAMES, FolderReader, OutputEntry, RawRange, TensorInfo
from .spec import canonical_shapes, is_projection_weight, is_router_bias, mtp_index

SCALE_SUFFIX = "_scale_inv"
CAST_CHUNK_ELEMENTS = 1 << 24  # casts run over ~16M values at a time, bounding the temporaries
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DTYPE_ALIASES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
                 "fp16": torch.float16, "float16": torch.float16}  # fmt: skip


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ConversionError(f"unknown layout {name!r}; expected one of {sorted(LAYOUTS)}") from None


def resolve_dtype(dtype) -> torch.dtype | str | None:
    """None, 'fp8', or a torch floating dtype, from a user-facing spelling."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() == "fp8":
        return "fp8"
    try:
        return DTYPE_ALIASES[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise ConversionError(f"unknown dtype {dtype!r}; expected bf16, fp32 or fp8") from None


@dataclass
class Group:
    """One tensor a layout stores and the canonical tensors in it (several for a stack, in storage order)."""

    key: str
    kind: str  # "rename", "stack" or "copy"
    members: list[str]
    shape: tuple[int, ...] = ()


def layout_groups(layout: Layout, config, shapes: dict[str, tuple]) -> tuple[list[Group], set[str]]:
    """Every tensor `layout` stores for `config` (with shapes), and the canonical keys it omits."""
    rules = concrete_rules(layout, config)
    key_rules = [r for r in rules if isinstance(r, (Rename, Stack, Omit))]
    groups: dict[str, Group] = {}
    stacked: dict[str, list] = {}
    omitted: set[str] = set()
    for name in shapes:
        for rule in key_rules:
            m = re.fullmatch(rule.canonical, name)
            if m is None:
                continue
            if isinstance(rule, Omit):
                omitted.add(name)
            elif isinstance(rule, Rename):
                key = m.expand(rule.layout)
                groups[key] = Group(key, "rename", [name], shapes[name])
            else:
                key = rule.layout.format(**m.groupdict())
                groups.setdefault(key, Group(key, "stack", []))
                stacked.setdefault(key, []).append((int(m["expert"]), rule.parts.index(m["part"]), name))
            break
        else:
            raise AssertionError(f"layout {layout.name} has no rule for {name}")
    for key, members in stacked.items():
        members.sort()
        experts = sorted({e for e, _, _ in members})
        rows, cols = shapes[members[0][2]]
        groups[key].members = [name for _, _, name in members]
        groups[key].shape = (len(experts), len(members) // len(experts) * rows, cols)
    for rule in rules:
        if isinstance(rule, Copy):
            source = canonical_alias(rule.canonical, config)
            groups[rule.layout] = Group(rule.layout, "copy", [source], shapes[source])
    return list(groups.values()), omitted


def canonical_alias(name: str, config) -> str:
    """A tied lm_head is the input embedding."""
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return "model.embed_tokens.weight"
    return name


# ---------------------------------------------------------------------------------------------------------------------
# Sources


class DictStore:
    """An in-memory state dict as a source; reads are views of its tensors."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.tensors = state_dict
        self.infos = {k: TensorInfo(k, t.dtype, tuple(t.shape)) for k, t in state_dict.items()}

    def read(self, key: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        flat = self.tensors[key].detach().reshape(-1)
        return flat[start:] if count is None else flat[start : start + count]

    def raw(self, key: str, start: int, count: int):
        return None

    def where(self, key: str) -> str:
        return "the state dict"


class FolderStore:
    """Tensors of safetensors files, read with `pread`s; unchanged ones can be copied as raw byte ranges."""

    def __init__(self, infos: dict[str, TensorInfo]):
        self.infos = infos
        self.reader = FolderReader(infos)

    def read(self, key: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        return self.reader.read(key, start, count)

    def raw(self, key: str, start: int, count: int) -> RawRange:
        info = self.infos[key]
        item = info.dtype.itemsize
        return RawRange(info.file, info.offset + start * item, count * item)

    def where(self, key: str) -> str:
        return str(self.infos[key].file)

    def close(self):
        self.reader.close()


@dataclass(frozen=True)
class Ref:
    """Where the values of one canonical tensor are: `key` (None: zeros) from element `start`, maybe FP8."""

    key: str | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int = 0
    scale: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class FP8Format:
    block: tuple[int, int] = fp8.DEFAULT_BLOCK
    scale_fmt: str | None = None

    @classmethod
    def from_config(cls, quantization_config: dict | None, source: str = "config.json") -> FP8Format:
        q = quantization_config or {}
        if q and (q.get("quant_method", "fp8") != "fp8" or q.get("fmt", "e4m3") != "e4m3"):
            raise ConversionError(
                f"{source}: unsupported quantization_config {q!r} (only block FP8 e4m3, as DeepSeek releases)"
            )
        block = q.get("weight_block_size") or fp8.DEFAULT_BLOCK
        if not (
            isinstance(block, (list, tuple))
            and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
        ):
            raise ConversionError(
                f"{source}: quantization_config.weight_block_size must be 2 positive integers, got {block!r}"
            )
        block = tuple(block)
        scale_fmt = q.get("scale_fmt")
        if scale_fmt not in fp8.SCALE_FORMATS:
            raise ConversionError(f"{source}: unsupported FP8 scale_fmt {scale_fmt!r}")
        return cls(block, scale_fmt)

    def quantization_config(self) -> dict:
        return fp8.release_quantization_config(self.block, self.scale_fmt)


@dataclass
class Source:
    """A source matched against the config: where every canonical tensor's values are."""

    store: object
    layout: Layout
    config: object  # the effective MoeMtpConfig (no MTP modules when the source has none)
    refs: dict[str, Ref]
    fp8: FP8Format
    dropped_mtp: bool = False
    unknown: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one line each: what was filled in or left out
    missing: list[str] = field(default_factory=list)  # absent canonical tensors (only with allow_missing)
    asked_mtp: int = 0  # MTP modules the given config has; `config` keeps those the source holds

    def mtp_note(self) -> str | None:
        held = self.config.num_nextn_predict_layers
        if held == self.asked_mtp:
            return None
        return f"the source holds {held} of the {self.asked_mtp} MTP module(s) its config asks for"

    @property
    def is_fp8(self) -> bool:
        return any(ref.scale for ref in self.refs.values())

    def default_float(self) -> torch.dtype:
        """The dtype the source keeps unquantized tensors in (FP8 weights dequantize to it by default)."""
        ref = self.refs.get("model.embed_tokens.weight")
        return ref.dtype if ref is not None and ref.dtype in FLOAT_DTYPES else torch.bfloat16


def _shape_error(store, key, expected, got) -> ConversionError:
    return ConversionError(
        f"tensor {key!r} in {store.where(key)} has shape {tuple(got)}, but the config implies {tuple(expected)}"
    )


def without_mtp(config):
    config = copy.deepcopy(config)
    config.num_nextn_predict_layers = 0
    return config


def resolve_source(
    store,
    layout: Layout,
    config,
    fp8_format: FP8Format | None = None,
    allow_unknown=False,
    allow_missing=False,
    missing_hint: str = "",
) -> Source:
    """Match a source's tensors against what `config` implies for `layout`; raise ConversionError on any mismatch.

    Checks every name, shape and dtype (floating point; block FP8 only for linear projections), FP8 scales
    (present, right shape and dtype, finite and positive), unknown names (an error unless `allow_unknown`) and
    missing tensors: an error naming them (followed by `missing_hint`) unless `allow_missing`, which lists them in
    `Source.missing` instead. Trailing MTP modules that are absent as a whole (transformers drops them; a base
    model has none) give an effective config with fewer MTP modules (see `Source.mtp_note`), and a missing router
    bias reads as zeros (with a line in `Source.notes`).
    """
    fp8_format = fp8_format or FP8Format()
    shapes = canonical_shapes(config)
    groups, omitted = layout_groups(layout, config, shapes)
    by_key = {g.key: g for g in groups}
    infos = store.infos
    ignore = [r.layout for r in concrete_rules(layout, config) if isinstance(r, Ignore)]
    unknown = []
    for key in infos:
        if key in by_key or (key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] in infos):
            continue  # a scale is checked with its weight below
        if not any(re.fullmatch(pattern, key) for pattern in ignore):
            unknown.append(key)
    refs: dict[str, Ref] = {}
    for group in groups:
        info = infos.get(group.key)
        if info is None:
            continue
        if tuple(info.shape) != tuple(group.shape):
            raise _shape_error(store, group.key, group.shape, info.shape)
        _check_dtype(store, group, info.dtype)
        scale = _check_scale_entry(store, group, info, fp8_format)
        if group.kind == "rename":
            refs[group.members[0]] = Ref(group.key, group.shape, info.dtype, 0, scale)
        elif group.kind == "stack":
            size = math.prod(shapes[group.members[0]])
            for j, name in enumerate(group.members):
                refs[name] = Ref(group.key, shapes[name], info.dtype, j * size)
    notes = []
    asked_mtp = config.num_nextn_predict_layers
    config = _present_mtp_modules(config, shapes, refs)
    shapes = canonical_shapes(config)
    biases = [name for name in shapes if name not in refs and is_router_bias(name)]
    for name in biases:
        refs[name] = Ref(None, shapes[name], torch.float32)
    biases = [name for name in biases if name not in omitted]  # a layout that never stores them: nothing to say
    if biases:
        notes.append(
            f"{len(biases)} router bias(es) ({biases[0]}{', ...' if len(biases) > 1 else ''}) missing from the "
            "source: they start at zero"
        )
    absent = set(shapes).difference(refs)
    stored = [g.key for g in groups if g.kind != "copy" and absent.intersection(g.members)]
    if stored and not allow_missing:
        raise ConversionError(
            f"{len(stored)} tensor(s) the config implies are missing from the source ({layout.name} layout): "
            + ", ".join(repr(k) for k in stored[:5])
            + (" ..." if len(stored) > 5 else "")
            + missing_hint
        )
    if unknown and not allow_unknown:
        raise ConversionError(
            f"{len(unknown)} tensor(s) the config does not account for ({layout.name} layout): "
            + ", ".join(f"{k!r} in {store.where(k)}" for k in unknown[:5])
            + (" ..." if len(unknown) > 5 else "")
            + " (pass allow_unknown / --allow-unknown to skip them)"
        )
    if unknown:
        warnings.warn(f"skipping {len(unknown)} unknown tensor(s): {', '.join(unknown[:5])}", stacklevel=2)
    _check_scale_values(store, refs, fp8_format)
    missing = [name for name in shapes if name in absent and name not in omitted]  # omitted: never stored
    dropped_mtp = asked_mtp > 0 and config.num_nextn_predict_layers == 0
    return Source(store, layout, config, refs, fp8_format, dropped_mtp, unknown, notes, missing, asked_mtp)


def _present_mtp_modules(config, shapes: dict, refs: dict):
    """The config with as many MTP modules as the source holds, when trailing modules are absent as a whole.

    A module that is partly there, or absent while a later one is present, is left for the missing-tensor check.
    """
    held = config.num_nextn_predict_layers
    while held and not any(name in refs for name in shapes if mtp_index(name) == held - 1):
        held -= 1
    if held == config.num_nextn_predict_layers:
        return config
    config = copy.deepcopy(config)
    config.num_nextn_predict_layers = held
    return config


def _check_dtype(store, group: Group, dtype: torch.dtype):
    """Floating point everywhere; block FP8 (e4m3) only for linear projection weights, as the release stores."""
    if dtype in FLOAT_DTYPES:
        return
    fp8_ok = group.kind == "rename" and is_projection_weight(group.members[0])
    if dtype == fp8.FP8_DTYPE and fp8_ok:
        return
    expected = "floating point (F32, BF16, F16" + (", or F8_E4M3 with a weight_scale_inv)" if fp8_ok else ")")
    raise ConversionError(
        f"tensor {group.key!r} in {store.where(group.key)} has dtype {DTYPE_NAMES.get(dtype, dtype)}; "
        f"expected {expected}"
    )


def _check_scale_entry(store, group: Group, info, fp8_format: FP8Format) -> str | None:
    """The key of a FP8 weight's scale, checked from the header (present, shape, dtype); None if not FP8."""
    scale_key = group.key + SCALE_SUFFIX
    if info.dtype != fp8.FP8_DTYPE:
        if scale_key in store.infos:
            raise ConversionError(
                f"tensor {scale_key!r} in {store.where(scale_key)} scales {group.key!r}, which is {info.dtype}, not FP8"
            )
        return None
    if group.kind == "stack":
        raise ConversionError(f"tensor {group.key!r} in {store.where(group.key)}: stacked FP8 is not supported")
    if len(info.shape) != 2:
        raise ConversionError(
            f"tensor {group.key!r} in {store.where(group.key)} is FP8 with shape {tuple(info.shape)}; "
            "block FP8 weights are 2-D"
        )
    scale_info = store.infos.get(scale_key)
    if scale_info is None:
        raise ConversionError(
            f"tensor {group.key!r} in {store.where(group.key)} is FP8 ({info.dtype}) but its {scale_key!r} is missing"
        )
    expected = fp8.scale_shape(info.shape, fp8_format.block)
    if tuple(scale_info.shape) != expected:
        raise ConversionError(
            f"tensor {scale_key!r} in {store.where(scale_key)} has shape {tuple(scale_info.shape)}, but "
            f"{group.key!r} of shape {tuple(info.shape)} needs {expected} ({list(fp8_format.block)} blocks)"
        )
    allowed = fp8.scale_dtypes(fp8_format.scale_fmt)
    if scale_info.dtype not in allowed:
        raise ConversionError(
            f"tensor {scale_key!r} in {store.where(scale_key)} has dtype {DTYPE_NAMES.get(scale_info.dtype)}; "
            f"FP8 scales ({fp8_format.scale_fmt or 'plain'} scale format) are "
            + " or ".join(DTYPE_NAMES[d] for d in allowed)
        )
    return scale_key


def _check_scale_values(store, refs: dict[str, Ref], fp8_format: FP8Format):
    """Every FP8 scale finite and positive: a zero would silently zero its block, a NaN poison it. Scales are
    1/16384 of the weights' size, so reading them all is cheap (and `--dry-run` does it too)."""
    for ref in refs.values():
        if ref.scale is not None:
            fp8.check_scale_values(store.read(ref.scale), name=ref.scale, where=store.where(ref.scale))


# ---------------------------------------------------------------------------------------------------------------------
# Destination plan


@dataclass
class Output:
    entry: OutputEntry
    produce: Callable[[], Iterator]  # yields tensors (row chunks, in order) or RawRanges


@dataclass
class Plan:
    outputs: list[Output]
    config: object  # effective config of the destination
    fp8: FP8Format | None  # set when the destination stores FP8 weights
    dtype: torch.dtype  # dtype of the unquantized floating tensors
    dropped: list[str]  # canonical tensors the destination layout cannot hold


class _Producers:
    """Chunk generators for the destination tensors, sharing one stash (FP8 scales made with their weights)."""

    def __init__(self, source: Source, allow_raw: bool):
        self.source = source
        self.store = source.store
        self.allow_raw = allow_raw
        self.stash: dict[str, torch.Tensor] = {}

    def values(self, ref: Ref, dtype: torch.dtype, allow_raw: bool | None = None) -> Iterator:
        """The canonical tensor `ref` converted to `dtype`, as row chunks (or one raw byte range)."""
        allow_raw = self.allow_raw if allow_raw is None else allow_raw
        if ref.key is None:
            yield torch.zeros(ref.shape, dtype=dtype)
            return
        if ref.scale is not None and dtype != fp8.FP8_DTYPE:
            q = self.store.read(ref.key).view(ref.shape)
            s = self.store.read(ref.scale).view(fp8.scale_shape(ref.shape, self.source.fp8.block))
            yield from fp8.iter_dequantize_block_fp8(q, s, self.source.fp8.block, dtype, name=ref.key)
            return
        n = ref.numel
        if dtype == ref.dtype:
            raw = self.store.raw(ref.key, ref.start, n) if allow_raw else None
            yield raw if raw is not None else self.store.read(ref.key, ref.start, n).view(ref.shape)
            return
        for a in range(0, n, CAST_CHUNK_ELEMENTS):
            yield self.store.read(ref.key, ref.start + a, min(CAST_CHUNK_ELEMENTS, n - a)).to(dtype)

    def tensor(self, ref: Ref, dtype: torch.dtype) -> torch.Tensor:
        chunks = list(self.values(ref, dtype, allow_raw=False))
        if len(chunks) == 1:
            return chunks[0].reshape(ref.shape)
        return torch.cat([c.reshape(-1) for c in chunks]).view(ref.shape)

    def passthrough_fp8(self, ref: Ref, fmt: FP8Format) -> bool:
        return (
            ref.scale is not None
            and tuple(self.source.fp8.block) == tuple(fmt.block)
            and (self.source.fp8.scale_fmt == fmt.scale_fmt)
        )

    def quantized(self, key: str, ref: Ref, fmt: FP8Format) -> Iterator:
        if self.passthrough_fp8(ref, fmt):
            yield from self.values(Ref(ref.key, ref.shape, ref.dtype), fp8.FP8_DTYPE)
            return
        weight = self.tensor(ref, torch.float32)
        q, s = fp8.quantize_block_fp8(weight, fmt.block, fmt.scale_fmt, name=key)
        del weight
        self.stash[key + SCALE_SUFFIX] = s
        yield q

    def scale(self, key: str, ref: Ref, fmt: FP8Format, dtype: torch.dtype) -> Iterator:
        if self.passthrough_fp8(ref, fmt):
            scale_info = self.store.infos[ref.scale]
            yield from self.values(Ref(ref.scale, scale_info.shape, scale_info.dtype), dtype)
            return
        yield self.stash.pop(key + SCALE_SUFFIX)


def written_fp8_format(source: Source, scale_fmt: str | None) -> FP8Format:
    """The FP8 format of written FP8 tensors: the source's block size (the release's for a non-FP8 source) and
    `scale_fmt` ("inherit" takes the source's)."""
    inherited = source.fp8.scale_fmt if source.is_fp8 else None
    fmt = FP8Format(source.fp8.block if source.is_fp8 else fp8.DEFAULT_BLOCK,
                    inherited if scale_fmt == "inherit" else scale_fmt)  # fmt: skip
    if fmt.scale_fmt not in fp8.SCALE_FORMATS:
        raise ConversionError(f"unknown FP8 scale_fmt {fmt.scale_fmt!r}; expected one of {fp8.SCALE_FORMATS}")
    return fmt


def plan_outputs(
    source: Source,
    dst: Layout,
    dtype=None,
    scale_fmt: str | None = "inherit",
    allow_raw: bool = True,
) -> Plan:
    """Every destination tensor, in order, with its dtype, shape and producer.

    `dtype`: None keeps the source dtypes (every FP8 tensor stays FP8 into the deepseek layout, whatever its name,
    and is dequantized to the source's unquantized dtype elsewhere); a torch float dtype casts every floating
    tensor; "fp8" (deepseek layout only) quantizes what the release quantizes (`Layout.fp8`) and stores the rest
    in bf16. The router bias is always float32.
    `scale_fmt` for written FP8: "inherit" (the source's, if FP8), None or "ue8m0".
    """
    dtype = resolve_dtype(dtype)
    if dtype == "fp8" and dst.fp8 is None:
        raise ConversionError(f"FP8 output needs the deepseek layout; the {dst.name} layout has no FP8 weights")
    config = source.config
    if dst.name == "transformers":
        config = without_mtp(config)
    shapes = canonical_shapes(config)
    groups, omitted = layout_groups(dst, config, shapes)
    default_float = source.default_float()
    keep_fp8 = dtype is None and source.is_fp8 and dst.fp8 is not None
    fmt = written_fp8_format(source, scale_fmt) if dtype == "fp8" or keep_fp8 else None
    producers = _Producers(source, allow_raw)
    refs = source.refs

    def out_dtype(key: str, ref: Ref) -> torch.dtype:
        if is_router_bias(key) or ref.key is None:
            return torch.float32
        stored = default_float if ref.scale is not None else ref.dtype
        if dtype is None or stored not in FLOAT_DTYPES:
            return stored
        return torch.bfloat16 if dtype == "fp8" else dtype

    def quantize(key: str, ref: Ref) -> bool:
        if fmt is None or len(ref.shape) != 2:
            return False
        if keep_fp8:  # what arrived as FP8 stays FP8, whatever its name (checkpoints differ from the release)
            return ref.scale is not None
        return re.fullmatch(dst.fp8, key) is not None  # dtype "fp8": what the release quantizes

    outputs: list[Output] = []
    for group in groups:
        if any(name not in refs for name in group.members):
            continue  # missing, and allowed to be (`Source.missing`)
        members = [refs[name] for name in group.members]
        if group.kind == "stack":
            t = out_dtype(group.key, members[0])

            def produce(members=members, t=t):
                for ref in members:
                    yield from producers.values(ref, t)

            outputs.append(Output(OutputEntry(group.key, t, tuple(group.shape)), produce))
            continue
        ref = members[0]
        if quantize(group.key, ref):
            key = group.key
            if producers.passthrough_fp8(ref, fmt):
                scale_dtype = source.store.infos[ref.scale].dtype
            else:
                scale_dtype = torch.float32
            outputs.append(Output(OutputEntry(key, fp8.FP8_DTYPE, ref.shape),
                                  lambda key=key, ref=ref: producers.quantized(key, ref, fmt)))  # fmt: skip
            outputs.append(Output(OutputEntry(key + SCALE_SUFFIX, scale_dtype, fp8.scale_shape(ref.shape, fmt.block)),
                                  lambda key=key, ref=ref, d=scale_dtype: producers.scale(key, ref, fmt, d)))  # fmt: skip
        else:
            t = out_dtype(group.key, ref)
            outputs.append(Output(OutputEntry(group.key, t, tuple(ref.shape)),
                                  lambda ref=ref, t=t: producers.values(ref, t)))  # fmt: skip
    dropped = [name for name in canonical_shapes(source.config) if name not in shapes or name in omitted]
    unquantized = torch.bfloat16 if dtype == "fp8" else (dtype if isinstance(dtype, torch.dtype) else default_float)
    return Plan(outputs, config, fmt, unquantized, dropped)


def check_dropped(source: Source, plan: Plan):
    """Warn about canonical tensors the destination cannot hold (MTP in transformers, nonzero V2 router bias)."""
    mtp = [name for name in plan.dropped if mtp_index(name) is not None]
    if mtp:
        warnings.warn(
            f"the destination layout has no MTP modules: {len(mtp)} MTP tensor(s) are not written", stacklevel=3
        )
    for name in plan.dropped:
        ref = source.refs.get(name)
        if is_router_bias(name) and mtp_index(name) is None and ref is not None and ref.key is not None:
            values = _Producers(source, False).tensor(ref, torch.float32)
            if values.abs().max() > 0:
                warnings.warn(f"{name} is nonzero but the destination layout stores no router bias", stacklevel=3)


def run_to_dict(plan: Plan) -> dict[str, torch.Tensor]:
    """Materialize a plan in memory (tensors may share memory with an in-memory source)."""
    out = {}
    for output in plan.outputs:
        entry = output.entry
        chunks = list(output.produce())
        if len(chunks) == 1:
            out[entry.key] = chunks[0].reshape(entry.shape)
        else:
            out[entry.key] = torch.cat([c.reshape(-1) for c in chunks]).view(entry.shape)
    return out


def convert_state_dict(
    state_dict: dict[str, torch.Tensor],
    config,
    src: str,
    dst: str,
    *,
    dtype=None,
    allow_unknown: bool = False,
    quantization_config: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Convert an in-memory state dict between the "moe_mtp", "deepseek" and "transformers" layouts.

    `config` is the MoeMtpConfig of the model. Every tensor is checked against it (names, shapes, FP8 scales).
    FP8 weights (with `weight_scale_inv`, block size from `quantization_config`, default 128x128) are dequantized
    unless `dst` is "deepseek" and `dtype` is None. `dtype`: see `plan_outputs`. Into "transformers" MTP
    tensors are dropped (with a warning); from it, a config's MTP modules are simply absent. Returned tensors may
    share memory with the input.
    """
    if not isinstance(state_dict, dict):
        state_dict = dict(state_dict)
    source = resolve_source(
        DictStore(state_dict), get_layout(src), config, FP8Format.from_config(quantization_config), allow_unknown
    )
    plan = plan_outputs(source, get_layout(dst), dtype, allow_raw=False)
    check_dropped(source, plan)
    return run_to_dict(plan)
