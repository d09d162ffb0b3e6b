"""Streaming checkpoint files: one tensor in memory at a time.

Readers
    * safetensors (Hugging Face shards and MindSpore's own files): `read_safetensors_header` parses and
      checks the header against the file length; `read_safetensors_tensor` reads one tensor into its own
      buffer; `load_safetensors` gives every tensor of a file as memory-mapped (zero-copy) arrays.
    * PyTorch zip files (`pytorch_model-*.bin`, SAT's `mp_rank_00_model_states.pt`): `read_torch_zip_index`
      unpickles `data.pkl` with a restricted unpickler that accepts tensors and containers only (the same
      guarantee as `torch.load(weights_only=True)`) and records, for every tensor, its storage entry,
      offset, shape and dtype without reading any tensor data; `read_torch_tensor` then reads the bytes
      of one tensor from its zip entry (CRC-checked when the tensor is its whole storage).

Writers (the output is planned first: every name, shape and dtype is known before any data is written;
each `write` puts one tensor at its planned offset, cast to the planned dtype in bounded chunks)
    * `SafetensorsWriter`: byte-identical to `safetensors.numpy.save_file(..., metadata={"format": "ms"})`,
      which is what `mindspore.save_checkpoint(..., format="safetensors")` writes.
    * `CkptWriter`: MindSpore's protobuf `Checkpoint` (`mindspore/train/checkpoint_pb2.py`), byte-identical
      to `mindspore.save_checkpoint` of MindSpore tensors: one serialized `Checkpoint` message with one
      `value` per tensor, the bytes of tensors over 512 MiB cut into 512 MiB pieces with the same tag (the
      loader joins consecutive pieces), messages concatenated (protobuf merges repeated fields).

Nothing here imports MindSpore or torch. Errors about the files are `CheckpointFileError` (a UserError).
"""
import json
import os
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from visualglm.errors import UserError


class CheckpointFileError(UserError):
    """A checkpoint file that cannot be read (missing, truncated, corrupt, refused) or written."""


CHUNK_BYTES = 64 << 20         # casts and copies while writing go through buffers of at most this size
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit

# ----- dtypes -----

# safetensors code -> numpy dtype. BF16 has no numpy dtype: it is read as uint16 bits and widened to float32.
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_}
_ST_CODES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
             np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
             np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.uint16): "U16",
             np.dtype(np.uint32): "U32", np.dtype(np.uint64): "U64", np.dtype(np.bool_): "BOOL"}
# safetensors writes the biggest alignment first, in the order of its Rust Dtype enum (then by name).
_ST_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
             "I64", "U64"]
# MindSpore's checkpoint tensor_type strings (str(mindspore dtype)).
_CKPT_TYPES = {np.dtype(np.float16): "Float16", np.dtype(np.float32): "Float32", np.dtype(np.float64): "Float64",
               np.dtype(np.int8): "Int8", np.dtype(np.int16): "Int16", np.dtype(np.int32): "Int32",
               np.dtype(np.int64): "Int64", np.dtype(np.uint8): "UInt8", np.dtype(np.uint16): "UInt16",
               np.dtype(np.uint32): "UInt32", np.dtype(np.uint64): "UInt64", np.dtype(np.bool_): "Bool"}
# torch legacy storage class names (what torch.save pickles) -> numpy dtype; "bf16" is widened to float32.
_TORCH_STORAGES = {"HalfStorage": np.float16, "FloatStorage": np.float32, "DoubleStorage": np.float64,
                   "BFloat16Storage": "bf16", "LongStorage": np.int64, "IntStorage": np.int32,
                   "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
                   "BoolStorage": np.bool_}


def bf16_to_float32(bits):
    """bfloat16 values given as their uint16 bits -> exact float32 values."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


# ----- low-level file access -----

_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"PK\x03\x04", "a zip archive"), (b"\x80\x02", "a Python pickle"), (b"\x80\x03", "a Python pickle"),
          (b"\x80\x04", "a Python pickle"), (b"\x80\x05", "a Python pickle"))


def file_kind(path):
    """What a file's first bytes say it is ('a PNG image', 'a Python pickle', 'an empty file', ...), or None;
    CheckpointFileError when it cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as err:
        raise CheckpointFileError(f"cannot read {path}: {err.strerror or err}") from None
    if not head:
        return "an empty file"
    return next((what for magic, what in _MAGIC if head.startswith(magic)), None)


def file_size(path):
    return os.stat(path).st_size


def _read_into(f, buffer, offset, path, what):
    """Fill `buffer` (a writable contiguous array) from byte `offset` of the open raw file `f`."""
    view = memoryview(buffer).cast("B")
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointFileError(f"{path}: truncated: {what} needs bytes {offset}..{offset + len(view)}, "
                                      f"the file ends at {offset + done}")
        done += n


def _empty(nbytes):
    return np.empty(nbytes, dtype=np.uint8)


# ----- safetensors: reading -----

@dataclass
class StEntry:
    """One tensor of a safetensors file: its dtype code, shape and absolute byte range in the file."""
    code: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def dtype(self):
        """The numpy dtype `read_safetensors_tensor` returns (BF16 is widened to float32)."""
        return np.dtype(np.float32) if self.code == "BF16" else np.dtype(_ST_DTYPES[self.code])


def read_safetensors_header(path):
    """({name: StEntry} in file order, metadata dict or None) of a safetensors file. The header is
    checked against the file: valid JSON, known dtypes, byte ranges that match the shapes, do not
    overlap, and end exactly at the end of the file (a truncated or padded file is refused)."""
    size = file_size(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFileError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointFileError(f"{path}: truncated or not a safetensors file (header length {n}, "
                                      f"file length {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=OrderedDict)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointFileError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    base = 8 + n
    entries = OrderedDict()
    try:
        for name, info in header.items():
            code, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            if code not in _ST_DTYPES:
                raise CheckpointFileError(f"{path}: tensor {name} has the unsupported dtype {code}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_ST_DTYPES[code]).itemsize
            if not 0 <= begin <= end or end - begin != nbytes:
                raise CheckpointFileError(f"{path}: corrupt safetensors header: {name} {code}{list(shape)} "
                                          f"has the byte range [{begin}, {end})")
            entries[name] = StEntry(code, shape, base + int(begin), base + int(end))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointFileError(f"{path}: corrupt safetensors header ({type(err).__name__}: {err})") from None
    spans = sorted((e.begin, e.end, name) for name, e in entries.items())
    position = base
    for begin, end, name in spans:
        if begin < position:
            raise CheckpointFileError(f"{path}: corrupt safetensors header: {name} overlaps another tensor")
        position = end
    if position != size:
        state = "truncated" if position > size else "corrupt (bytes after the last tensor)"
        raise CheckpointFileError(f"{path}: {state}: the header describes {position} bytes, the file has {size}")
    return entries, metadata


def read_safetensors_tensor(path, entry, f=None):
    """One tensor of a safetensors file as a new array (its own buffer; BF16 widened to float32)."""
    nbytes = entry.end - entry.begin
    buffer = _empty(nbytes)
    if f is None:
        with open(path, "rb", buffering=0) as handle:
            _read_into(handle, buffer, entry.begin, path, "a tensor")
    else:
        _read_into(f, buffer, entry.begin, path, "a tensor")
    array = buffer.view(_ST_DTYPES[entry.code]).reshape(entry.shape)
    return bf16_to_float32(array) if entry.code == "BF16" else array


def load_safetensors(path, names=None):
    """{name: numpy array} of a safetensors file (e.g. one written by `convert_weight.py` or
    `mindspore.save_checkpoint(..., format="safetensors")`), in file order. The arrays are read-only views
    of a memory map of the file: nothing is copied until a page is touched, and pages can be dropped by
    the OS again. `names`: an iterable of the names to return (default all). BF16 tensors are copied to
    float32. The header is validated as in `read_safetensors_header`."""
    import mmap
    entries, _ = read_safetensors_header(path)
    wanted = entries if names is None else OrderedDict((n, entries[n]) for n in entries if n in set(names))
    out = OrderedDict()
    if not wanted:
        return out
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    for name, entry in wanted.items():
        count = int(np.prod(entry.shape, dtype=np.int64))
        array = np.frombuffer(mapped, dtype=_ST_DTYPES[entry.code], count=count, offset=entry.begin)
        array = array.reshape(entry.shape)
        out[name] = bf16_to_float32(array) if entry.code == "BF16" else array
    return out


# ----- PyTorch zip files: reading -----

@dataclass
class TorchTensorRef:
    """Where a tensor's bytes are in a PyTorch zip file (nothing is read yet)."""
    entry: str              # zip member holding the storage, e.g. "archive/data/3"
    storage_dtype: object   # numpy dtype, or "bf16"
    offset: int             # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self):
        return np.dtype(np.float32) if self.storage_dtype == "bf16" else np.dtype(self.storage_dtype)

    @property
    def itemsize(self):
        return 2 if self.storage_dtype == "bf16" else np.dtype(self.storage_dtype).itemsize

    @property
    def contiguous(self):
        expected, step = [], 1
        for dim in reversed(self.shape):
            expected.append(step)
            step *= dim
        return all(d == 1 or s == e for d, s, e in zip(self.shape, self.stride, reversed(expected)))

    @property
    def extent(self):
        """Elements of the storage the tensor spans, from its offset."""
        if any(d == 0 for d in self.shape):
            return 0
        return 1 + sum((d - 1) * s for d, s in zip(self.shape, self.stride))


class _StorageType:
    def __init__(self, name):
        self.name = name


class _Refused(Exception):
    pass


class _IndexUnpickler(pickle.Unpickler):
    """Tensors, dicts, lists, tuples and plain values only; records storages instead of loading them."""

    def __init__(self, data, prefix):
        import io
        super().__init__(io.BytesIO(data))
        self.prefix = prefix

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad=False, backward_hooks=None: data
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and name in _TORCH_STORAGES:
            return _StorageType(name)
        if module == "torch" and name == "Size":
            return tuple
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise _Refused(f"persistent id {pid!r:.60}")
        return (f"{self.prefix}/data/{pid[2]}", _TORCH_STORAGES[pid[1].name])

    @staticmethod
    def _rebuild_tensor(storage, storage_offset, size, stride, *args):
        if not (isinstance(storage, tuple) and len(storage) == 2):
            raise _Refused("a tensor without a storage")
        entry, dtype = storage
        return TorchTensorRef(entry, dtype, int(storage_offset), tuple(int(s) for s in size),
                              tuple(int(s) for s in stride))


def is_zip_file(path):
    return zipfile.is_zipfile(path)


def read_torch_zip_index(path):
    """(unpickled object with TorchTensorRef leaves, {member name: ZipInfo}) of a PyTorch zip file,
    without reading tensor data. Refuses any pickle that would construct something other than tensors
    and containers (like torch.load(weights_only=True)) and checks that every tensor's bytes lie inside
    its storage member."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {info.filename: info for info in zf.infolist()}
            pickles = [name for name in infos if name.endswith("/data.pkl") and name.count("/") == 1]
            if len(pickles) != 1:
                raise CheckpointFileError(f"{path}: not a PyTorch checkpoint (no single */data.pkl in the zip)")
            prefix = pickles[0][:-len("/data.pkl")]
            data = zf.read(pickles[0])
            byteorder = infos.get(f"{prefix}/byteorder")
            if byteorder is not None and zf.read(byteorder).strip() not in (b"little", b""):
                raise CheckpointFileError(f"{path}: big-endian PyTorch files are not supported")
    except zipfile.BadZipFile as err:
        raise CheckpointFileError(f"{path}: truncated or corrupt PyTorch file ({err})") from None
    except (OSError, EOFError, zlib.error) as err:
        raise CheckpointFileError(f"{path}: truncated or corrupt PyTorch file ({type(err).__name__}: {err})") \
            from None
    try:
        obj = _IndexUnpickler(data, prefix).load()
    except _Refused as err:
        raise CheckpointFileError(f"{path}: refused: its pickle asks for {err}, which is not a tensor (only "
                                  "tensors are accepted, as with torch.load(weights_only=True))") from None
    except Exception as err:  # noqa: BLE001  a damaged pickle raises anything
        raise CheckpointFileError(f"{path}: corrupt PyTorch file (data.pkl: {type(err).__name__}: {err})") from None
    size = file_size(path)
    for ref in _walk_refs(obj):
        info = infos.get(ref.entry)
        if info is None:
            raise CheckpointFileError(f"{path}: corrupt PyTorch file (storage {ref.entry} is missing)")
        need = (ref.offset + ref.extent) * ref.itemsize
        if need > info.file_size or info.header_offset + info.compress_size > size:
            raise CheckpointFileError(f"{path}: truncated or corrupt PyTorch file (storage {ref.entry} holds "
                                      f"{info.file_size} bytes, a tensor needs {need})")
    return obj, infos


def _walk_refs(obj):
    if isinstance(obj, TorchTensorRef):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _walk_refs(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _walk_refs(value)


def _member_data_offset(f, info, path):
    """Absolute offset of a stored zip member's first byte (after its local header)."""
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise CheckpointFileError(f"{path}: corrupt PyTorch file (bad local header of {info.filename})")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def read_torch_tensor(path, ref, info, f=None):
    """One tensor of a PyTorch zip file as a new array (its own buffer; bf16 widened to float32). A tensor
    that is its whole storage is checked against the member's CRC-32."""
    nbytes = int(np.prod(ref.shape, dtype=np.int64)) * ref.itemsize
    span = ref.extent * ref.itemsize
    start = ref.offset * ref.itemsize
    raw_dtype = np.uint16 if ref.storage_dtype == "bf16" else ref.storage_dtype
    if info.compress_type != zipfile.ZIP_STORED:   # torch never compresses; a re-zipped file might
        try:
            with zipfile.ZipFile(path) as zf, zf.open(info) as member:
                member.seek(start)
                buffer = np.frombuffer(member.read(span), dtype=np.uint8).copy()
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:
            raise CheckpointFileError(f"{path}: corrupt: {info.filename}: {err}") from None
    else:
        buffer = _empty(span)
        handle = f if f is not None else open(path, "rb", buffering=0)
        try:
            _read_into(handle, buffer, _member_data_offset(handle, info, path) + start, path, info.filename)
        finally:
            if f is None:
                handle.close()
        if start == 0 and span == info.file_size and zlib.crc32(buffer) != info.CRC:
            raise CheckpointFileError(f"{path}: corrupt: CRC-32 mismatch in {info.filename}")
    if ref.contiguous:
        array = buffer[:nbytes].view(raw_dtype).reshape(ref.shape)
    else:
        flat = buffer.view(raw_dtype)
        array = np.lib.stride_tricks.as_strided(
            flat, ref.shape, tuple(s * ref.itemsize for s in ref.stride)).copy()
    return bf16_to_float32(array) if ref.storage_dtype == "bf16" else array


# ----- writing -----

@dataclass
class TensorSpec:
    """A tensor to be written: name, shape and the dtype it is stored in."""
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self):
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _cast_chunks(array, dtype):
    """The bytes of `array` as `dtype` in C order, as successive buffers of at most about CHUNK_BYTES."""
    array = np.asarray(array)
    dtype = np.dtype(dtype)
    if array.ndim == 0:
        array = array.reshape(1)
    rows = array.shape[0]
    row_bytes = max(1, (array.size // max(rows, 1)) * max(dtype.itemsize, array.dtype.itemsize))
    step = max(1, CHUNK_BYTES // row_bytes)
    for r0 in range(0, rows, step):
        chunk = np.ascontiguousarray(array[r0:r0 + step], dtype=dtype)
        yield memoryview(chunk).cast("B")


def _pwrite_all(fd, view, offset):
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _write_views(fd, views, segments):
    """Write the byte buffers `views`, in order, into the file byte ranges `segments` [(offset, length)]
    (filled in order). Returns the number of bytes written."""
    segments = list(segments)
    index, used, total = 0, 0, 0
    for view in views:
        while len(view):
            if index == len(segments):
                raise ValueError("more data than planned")
            offset, length = segments[index]
            n = min(len(view), length - used)
            _pwrite_all(fd, view[:n], offset + used)
            view, used, total = view[n:], used + n, total + n
            if used == length:
                index, used = index + 1, 0
    return total


class _PlannedWriter:
    """Common part: a file opened for writing whose layout is fixed up front; each tensor is written once,
    at its planned place, in any order; `close` checks that every planned tensor was written."""

    def __init__(self, path, specs):
        self.path = path
        self.specs = OrderedDict()
        for spec in specs:
            if spec.name in self.specs:
                raise ValueError(f"{path}: {spec.name} planned twice")
            self.specs[spec.name] = TensorSpec(spec.name, tuple(int(d) for d in spec.shape), np.dtype(spec.dtype))
        self.written = set()
        self.fd = None

    def open(self):
        """Create the file (exclusively: it must not exist) and write the non-tensor bytes."""
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            self._write_skeleton()
        except BaseException:
            self.abort()
            os.remove(self.path)
            raise
        return self

    def write(self, name, array):
        spec = self.specs.get(name)
        if spec is None:
            raise ValueError(f"{self.path}: {name} was not planned")
        if name in self.written:
            raise ValueError(f"{self.path}: {name} written twice")
        if tuple(np.shape(array)) != spec.shape:
            raise ValueError(f"{self.path}: {name} is {tuple(np.shape(array))}, planned {spec.shape}")
        self._write_tensor(spec, array)
        self.written.add(name)

    def write_chunks(self, name, chunks):
        """Write tensor `name` from successive flat chunks (C order, any dtype: cast to the planned one),
        so that a tensor never needs to be in memory whole."""
        spec = self.specs.get(name)
        if spec is None or name in self.written:
            raise ValueError(f"{self.path}: {name} " + ("was not planned" if spec is None else "written twice"))
        views = (memoryview(np.ascontiguousarray(c, dtype=spec.dtype).reshape(-1)).cast("B") for c in chunks)
        if _write_views(self.fd, views, self._segments(spec)) != spec.nbytes:
            raise ValueError(f"{self.path}: {name}: the chunks do not fill its {spec.nbytes} bytes")
        self.written.add(name)

    def _write_tensor(self, spec, array):
        _write_views(self.fd, _cast_chunks(array, spec.dtype), self._segments(spec))

    def close(self):
        """Finish the file; raises if a planned tensor was not written."""
        if self.fd is None:
            return
        try:
            missing = [n for n in self.specs if n not in self.written]
            if missing:
                raise ValueError(f"{self.path}: {len(missing)} planned tensors not written, e.g. {missing[0]}")
            os.fsync(self.fd)
        finally:
            self.abort()

    def abort(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.open()

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SafetensorsWriter(_PlannedWriter):
    """A safetensors file as `safetensors.numpy.save_file(tensors, path, metadata)` writes it (header
    first, tensors ordered by dtype then name, 8-byte padded header), written one tensor at a time.
    The default metadata `{"format": "ms"}` is what MindSpore writes."""

    def __init__(self, path, specs, metadata=None):
        super().__init__(path, specs)
        for spec in self.specs.values():
            if spec.dtype not in _ST_CODES:
                raise ValueError(f"{path}: {spec.name}: safetensors cannot hold {spec.dtype}")
        self.metadata = {"format": "ms"} if metadata is None else metadata
        order = sorted(self.specs.values(),
                       key=lambda s: (-_ST_ORDER.index(_ST_CODES[s.dtype]), s.name.encode("utf-8")))
        header = OrderedDict()
        if self.metadata:
            header["__metadata__"] = self.metadata
        position = 0
        self.offsets = {}
        for spec in order:
            header[spec.name] = {"dtype": _ST_CODES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [position, position + spec.nbytes]}
            self.offsets[spec.name] = position
            position += spec.nbytes
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (-len(text) % 8)
        self.header = struct.pack("<Q", len(text)) + text
        self.size = len(self.header) + position

    def _write_skeleton(self):
        os.pwrite(self.fd, self.header, 0)
        os.ftruncate(self.fd, self.size)

    def _segments(self, spec):
        return [(len(self.header) + self.offsets[spec.name], spec.nbytes)]


SLICE_BYTES = 512 * 1024 * 1024   # mindspore.train.serialization.SLICE_SIZE (KB) * 1024


def _varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number, payload):
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _slice_lengths(nbytes, slice_bytes):
    """Content lengths of the `value` entries of one tensor: mindspore.save_checkpoint cuts a tensor's
    bytes into pieces of SLICE_SIZE KB. An empty tensor gets one empty entry here (MindSpore writes none
    and so loses it)."""
    if nbytes == 0:
        return [0]
    return [min(slice_bytes, nbytes - start) for start in range(0, nbytes, slice_bytes)]


def ckpt_entry_header(name, shape, dtype, content_bytes):
    """The bytes of one serialized `Checkpoint{value{tag, tensor{dims, tensor_type, tensor_content}}}`
    message up to (not including) its tensor_content bytes."""
    dims = b"".join(_varint(1 << 3 | 0) + _varint(int(d) & (2 ** 64 - 1)) for d in shape)
    tensor_head = dims + _field(2, _CKPT_TYPES[np.dtype(dtype)].encode())
    tensor_len = len(tensor_head) + len(_varint(3 << 3 | 2)) + len(_varint(content_bytes)) + content_bytes
    value_head = _field(1, name.encode("utf-8")) + _varint(2 << 3 | 2) + _varint(tensor_len) + tensor_head \
        + _varint(3 << 3 | 2) + _varint(content_bytes)
    value_len = len(value_head) + content_bytes
    return _varint(1 << 3 | 2) + _varint(value_len) + value_head


class CkptWriter(_PlannedWriter):
    """A MindSpore `.ckpt` file as `mindspore.save_checkpoint([{"name": n, "data": t}, ...], path)` writes
    it (tensors in the order planned), written one tensor at a time."""

    def __init__(self, path, specs, slice_bytes=SLICE_BYTES):
        super().__init__(path, specs)
        self.layout = {}
        position = 0
        for spec in self.specs.values():
            if spec.dtype not in _CKPT_TYPES:
                raise ValueError(f"{path}: {spec.name}: a .ckpt cannot hold {spec.dtype}")
            pieces = []
            for content in _slice_lengths(spec.nbytes, slice_bytes):
                head = ckpt_entry_header(spec.name, spec.shape, spec.dtype, content)
                pieces.append((position, head, content))
                position += len(head) + content
            self.layout[spec.name] = pieces
        self.size = position

    def _write_skeleton(self):
        for pieces in self.layout.values():
            for position, head, _ in pieces:
                os.pwrite(self.fd, head, position)
        os.ftruncate(self.fd, self.size)

    def _segments(self, spec):
        return [(position + len(head), content) for position, head, content in self.layout[spec.name] if content]


def output_format(path):
    """"safetensors" for a path ending in .safetensors, else "ckpt"."""
    return "safetensors" if str(path).endswith(".safetensors") else "ckpt"


def writer_for(path, specs, fmt=None):
    """A SafetensorsWriter or CkptWriter for `path`; fmt ("safetensors" | "ckpt") defaults to the path's."""
    fmt = fmt or output_format(path)
    return SafetensorsWriter(path, specs) if fmt == "safetensors" else CkptWriter(path, specs)
