"""Streaming safetensors I/O: headers, checkpoint folders, tensor reads, shard writes.

The format is an 8-byte little-endian header length, a JSON header (`{name: {dtype, shape, data_offsets}}`,
`__metadata__`) and the raw tensor bytes. Reading parses the header and `pread`s only the bytes a tensor (or a slice
of its rows) needs, into memory we own: unlike `safe_open`'s memory map, that keeps the resident set at one tensor
whatever the file size. Writing emits the header first (every shape is known from the plan) and then streams each
tensor, so a shard never sits in memory as a whole; tensors copied unchanged go file to file in the kernel
(`copy_file_range`) without passing through Python at all.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConversionError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives: file, absolute byte offset, dtype and shape (no data read)."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path | None = None
    offset: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one .safetensors header; a truncated or malformed file raises ConversionError naming it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise ConversionError(
                    f"{path}: truncated or corrupt safetensors file (header of {header_len} bytes, file of {size})"
                )
            header = json.loads(fh.read(header_len))
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read ({exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: corrupt safetensors header ({exc})") from exc
    except RecursionError:
        raise ConversionError(f"{path}: corrupt safetensors header (nested too deeply)") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    data_size = size - data_start
    infos: dict[str, TensorInfo] = {}
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, stop = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConversionError(
                f"{path}: tensor {key!r} has an unsupported or malformed header entry {entry!r}"
            ) from exc
        info = TensorInfo(key, dtype, shape, path, data_start + begin)
        if stop - begin != info.nbytes or begin < 0:
            raise ConversionError(f"{path}: tensor {key!r} spans {stop - begin} bytes, its shape needs {info.nbytes}")
        infos[key] = info
        end = max(end, stop)
    if end > data_size:
        raise ConversionError(
            f"{path}: truncated safetensors file: its header describes {end} bytes of tensor data, "
            f"the file holds {data_size}"
        )
    _check_with_safetensors(path)
    return infos


def _check_with_safetensors(path: Path):
    """Let the safetensors library validate the file too (offsets, overlaps); its errors are re-raised naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as exc:  # safetensors raises its own SafetensorError and several builtin types
        raise ConversionError(f"{path}: invalid safetensors file ({exc})") from exc


def check_checkpoint_folder(folder: Path):
    """A source must be a local folder: hub ids are not downloaded here, and pickle files are never read."""
    folder = Path(folder)
    if folder.is_file() and folder.suffix in PICKLE_SUFFIXES:
        raise ConversionError(f"{folder}: pickle checkpoints are not supported (safetensors only; never unpickled)")
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ConversionError(
            f"{folder} {what}: the source must be a local checkpoint folder (config.json + safetensors files); "
            "download a hub model first"
        )


def read_json_file(path: Path, what: str = "JSON file"):
    """Parse a JSON file; unreadable, malformed or absurdly nested text raises ConversionError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found") from None
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read ({exc})") from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ConversionError(f"{path}: not a valid {what} ({detail})") from None


def read_index(folder: Path) -> dict[str, str] | None:
    """The `weight_map` of a folder's model.safetensors.index.json (None without one), checked: a JSON object
    whose `weight_map` maps tensor names to file names inside the folder."""
    index = Path(folder) / INDEX_NAME
    if not index.is_file():
        return None
    data = read_json_file(index, "safetensors index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{index}: not a valid safetensors index (needs a \"weight_map\" object of "
                              "tensor name -> file name)")  # fmt: skip
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise ConversionError(f"{index}: maps {key!r} to {name!r}; expected a file name")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ConversionError(f"{index}: maps {key!r} to {name!r}, outside the checkpoint folder")
    return weight_map


def checkpoint_files(folder: Path) -> list[Path]:
    """The .safetensors files of a checkpoint folder: from its index, else `model.safetensors`, else all of them.

    Pickle checkpoints are refused (never unpickled); an index naming a missing file raises ConversionError.
    """
    folder = Path(folder)
    check_checkpoint_folder(folder)
    weight_map = read_index(folder)
    if weight_map is not None:
        files = []
        for key, name in weight_map.items():
            path = folder / name
            if path not in files:
                if not path.is_file():
                    raise ConversionError(
                        f"{folder / INDEX_NAME}: maps {key!r} to {name!r}, which does not exist in {folder}"
                    )
                files.append(path)
        unlisted = sorted(p.name for p in folder.glob("*.safetensors") if p not in files)
        if unlisted:
            raise ConversionError(
                f"{folder / INDEX_NAME}: does not list {', '.join(unlisted[:3])}, which the folder holds; "
                "fix the index (or move the file away)"
            )
        return files
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ConversionError(
            f"{folder}: holds a pickle checkpoint ({', '.join(pickles[:3])}); only safetensors are supported "
            "(pickle files can run arbitrary code and are never unpickled). Convert it to safetensors first."
        )
    raise ConversionError(f"{folder}: no {INDEX_NAME}, {SINGLE_NAME} or *.safetensors file")


def read_folder_headers(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint folder, from the headers alone; duplicates across files are an error."""
    folder = Path(folder)
    infos: dict[str, TensorInfo] = {}
    index = folder / INDEX_NAME
    weight_map = read_index(folder)
    for path in checkpoint_files(folder):
        for key, info in read_header(path).items():
            if key in infos:
                raise ConversionError(f"tensor {key!r} is stored twice, in {infos[key].file} and {path}")
            if weight_map is not None and key in weight_map and folder / weight_map[key] != path:
                raise ConversionError(f"{index}: maps {key!r} to {weight_map[key]!r} but it is in {path.name}")
            infos[key] = info
    if weight_map is not None:
        missing = [key for key in weight_map if key not in infos]
        if missing:
            raise ConversionError(
                f"{index}: maps {missing[0]!r} to {weight_map[missing[0]]!r}, which does not hold it"
                + (f" ({len(missing) - 1} more)" if len(missing) > 1 else "")
            )
    return infos


class FolderReader:
    """Reads tensors, or runs of their elements, from safetensors files with plain `pread`s."""

    def __init__(self, infos: dict[str, TensorInfo]):
        self.infos = infos
        self._fds: dict[Path, int] = {}

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read(self, key: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements [start, start+count) of tensor `key` in storage order, as a 1-D tensor of its dtype."""
        info = self.infos[key]
        if count is None:
            count = info.numel - start
        item = info.dtype.itemsize
        buf = torch.empty(count * item, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        pos, offset = 0, info.offset + start * item
        try:
            fd = self._fd(info.file)
            while pos < len(view):
                n = os.preadv(fd, [view[pos:]], offset + pos)
                if n <= 0:
                    raise ConversionError(f"{info.file}: truncated while reading tensor {key!r}")
                pos += n
        except OSError as exc:
            raise ConversionError(f"{info.file}: cannot read tensor {key!r} ({exc})") from exc
        return buf.view(info.dtype)

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@dataclass(frozen=True)
class RawRange:
    """Bytes to copy unchanged from a source file (no decoding)."""

    file: Path
    offset: int
    nbytes: int


@dataclass(frozen=True)
class OutputEntry:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _header_bytes(entries: list[OutputEntry], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for entry in entries:
        header[entry.key] = {
            "dtype": DTYPE_NAMES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def _write_all(fd: int, data: memoryview):
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _copy_range(src_fd: int, dst_fd: int, offset: int, nbytes: int):
    """Copy bytes file to file inside the kernel when possible, else through a bounded buffer."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < nbytes:
                n = os.copy_file_range(src_fd, dst_fd, nbytes - done, offset + done)
                if n == 0:
                    break
                done += n
        except OSError:
            pass  # e.g. EXDEV on old kernels: fall back to plain reads and writes
    while done < nbytes:
        chunk = os.pread(src_fd, min(nbytes - done, 64 << 20), offset + done)
        if not chunk:
            raise OSError(f"unexpected end of file after {done} of {nbytes} bytes")
        _write_all(dst_fd, memoryview(chunk))
        done += len(chunk)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def write_shard(
    path: Path,
    entries: list[OutputEntry],
    produce,
    reader: FolderReader | None = None,
    on_tensor=None,
    metadata: dict[str, str] | None = None,
):
    """Write one .safetensors file: the header, then for each entry the chunks `produce(entry)` yields.

    A chunk is a tensor (its bytes are written) or a RawRange (copied from the source file). Each entry must
    produce exactly its declared number of bytes. `on_tensor(entry)` is called after each tensor (progress).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, memoryview(_header_bytes(entries, metadata or {"format": "pt"})))
        for entry in entries:
            written = 0
            for chunk in produce(entry):
                if isinstance(chunk, RawRange):
                    _copy_range(reader._fd(chunk.file), fd, chunk.offset, chunk.nbytes)
                    written += chunk.nbytes
                else:
                    if chunk.dtype != entry.dtype:
                        raise AssertionError(f"{entry.key}: produced {chunk.dtype}, planned {entry.dtype}")
                    data = tensor_bytes(chunk)
                    _write_all(fd, data)
                    written += len(data)
            if written != entry.nbytes:
                raise AssertionError(f"{entry.key}: produced {written} bytes, planned {entry.nbytes}")
            if on_tensor is not None:
                on_tensor(entry)
    finally:
        os.close(fd)


def plan_shards(entries: Iterable[OutputEntry], max_bytes: int) -> list[list[OutputEntry]]:
    """Split entries, in order, into shards of at most `max_bytes` (a larger tensor gets a shard to itself)."""
    shards: list[list[OutputEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards if shards[-1] else shards[:-1]


def shard_names(count: int) -> Iterator[str]:
    if count == 1:
        yield SINGLE_NAME
        return
    for i in range(count):
        yield f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def parse_size(size: int | str) -> int:
    """'5GB', '500MB', '50MiB', '1024' -> bytes (decimal units as in transformers, binary with 'iB')."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40, "KB": 10**3, "MB": 10**6,
             "GB": 10**9, "TB": 10**12, "B": 1}  # fmt: skip
    unit = next((u for u in units if text.endswith(u)), "")
    number, factor = text[: len(text) - len(unit)], units.get(unit, 1)
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise ConversionError(f"cannot parse size {size!r} (use e.g. 5GB, 500MB, 50MiB)") from None
    if value <= 0:
        raise ConversionError(f"size must be positive, got {size!r}")
    return value
