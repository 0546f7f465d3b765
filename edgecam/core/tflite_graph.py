"""A small reader (and one careful writer) for the TFLite flatbuffer format.

Only what edgecam needs: tensors, operators, constant buffers and the subgraph's
outputs. It works with either runtime installed, since tflite-runtime ships no
schema module. Field numbers follow tensorflow/lite/schema/schema.fbs, which is
append-only, so they are stable across TFLite versions.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

# BuiltinOperator codes used by the head search (schema.fbs).
OP_NAMES = {
    0: "ADD",
    1: "AVERAGE_POOL_2D",
    2: "CONCATENATION",
    3: "CONV_2D",
    4: "DEPTHWISE_CONV_2D",
    6: "DEQUANTIZE",
    9: "FULLY_CONNECTED",
    14: "LOGISTIC",
    17: "MAX_POOL_2D",
    18: "MUL",
    19: "RELU",
    21: "RELU6",
    22: "RESHAPE",
    23: "RESIZE_BILINEAR",
    25: "SOFTMAX",
    32: "CUSTOM",
    34: "PAD",
    40: "MEAN",
    39: "TRANSPOSE",
    41: "SUB",
    42: "DIV",
    43: "SQUEEZE",
    45: "STRIDED_SLICE",
    49: "SPLIT",
    50: "LOG_SOFTMAX",
    56: "ARG_MAX",
    97: "RESIZE_NEAREST_NEIGHBOR",
    114: "QUANTIZE",
}

# TensorType enum -> numpy dtype (None where edgecam has no use for it).
TENSOR_TYPES: dict[int, type | None] = {
    0: np.float32,
    1: np.float16,
    2: np.int32,
    3: np.uint8,
    4: np.int64,
    5: None,
    6: np.bool_,
    7: np.int16,
    8: None,
    9: np.int8,
    10: np.float64,
}


class GraphFormatError(ValueError):
    """The bytes are not a TFLite flatbuffer edgecam can read."""


class _Buf:
    """Bounds-checked little-endian access to a flatbuffer."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data = memoryview(data)
        self.size = len(self.data)

    def _check(self, pos: int, n: int) -> None:
        if pos < 0 or pos + n > self.size:
            raise GraphFormatError(
                f"offset {pos} is outside the file ({self.size} bytes): truncated or not a TFLite model"
            )

    def i32(self, pos: int) -> int:
        self._check(pos, 4)
        return struct.unpack_from("<i", self.data, pos)[0]

    def u32(self, pos: int) -> int:
        self._check(pos, 4)
        return struct.unpack_from("<I", self.data, pos)[0]

    def u16(self, pos: int) -> int:
        self._check(pos, 2)
        return struct.unpack_from("<H", self.data, pos)[0]


class _Table:
    def __init__(self, buf: _Buf, pos: int) -> None:
        self.buf = buf
        self.pos = pos
        vtable = pos - buf.i32(pos)
        self.vtable = vtable
        self.vt_len = buf.u16(vtable)

    def field_pos(self, index: int) -> int | None:
        entry = 4 + 2 * index
        if entry >= self.vt_len:
            return None
        off = self.buf.u16(self.vtable + entry)
        return self.pos + off if off else None

    def scalar(self, index: int, fmt: str, default: int | float = 0) -> int | float:
        pos = self.field_pos(index)
        if pos is None:
            return default
        self.buf._check(pos, struct.calcsize(fmt))
        return struct.unpack_from("<" + fmt, self.buf.data, pos)[0]

    def _indirect(self, index: int) -> int | None:
        pos = self.field_pos(index)
        if pos is None:
            return None
        return pos + self.buf.u32(pos)

    def table(self, index: int) -> _Table | None:
        pos = self._indirect(index)
        return None if pos is None else _Table(self.buf, pos)

    def string(self, index: int) -> str:
        pos = self._indirect(index)
        if pos is None:
            return ""
        n = self.buf.u32(pos)
        self.buf._check(pos + 4, n)
        return bytes(self.buf.data[pos + 4 : pos + 4 + n]).decode("utf-8", "replace")

    def vector(self, index: int, dtype: str) -> np.ndarray:
        pos = self._indirect(index)
        if pos is None:
            return np.zeros(0, dtype=dtype)
        n = self.buf.u32(pos)
        dt = np.dtype(dtype).newbyteorder("<")
        self.buf._check(pos + 4, n * dt.itemsize)
        return np.frombuffer(self.buf.data, dtype=dt, count=n, offset=pos + 4)

    def tables(self, index: int) -> list[_Table]:
        pos = self._indirect(index)
        if pos is None:
            return []
        n = self.buf.u32(pos)
        out = []
        for i in range(n):
            elem = pos + 4 + 4 * i
            out.append(_Table(self.buf, elem + self.buf.u32(elem)))
        return out


@dataclass(frozen=True)
class Quantization:
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int

    @property
    def quantized(self) -> bool:
        return self.scale.size > 0

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """Real values of a quantized array, per tensor or per channel."""
        if not self.quantized:
            return np.asarray(q, dtype=np.float32)
        scale = self.scale.astype(np.float32)
        zp = self.zero_point.astype(np.float32)
        if scale.size > 1:
            shape = [1] * q.ndim
            # An axis past the rank (TFLite Micro's person detector has them) means the only one there is.
            shape[self.axis if self.axis < q.ndim else 0] = scale.size
            scale = scale.reshape(shape)
            zp = zp.reshape(shape)
        return (q.astype(np.float32) - zp) * scale


@dataclass(frozen=True)
class Tensor:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: type | None
    buffer: int
    quant: Quantization


@dataclass(frozen=True)
class Operator:
    index: int
    op: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options: dict[str, int] = field(default_factory=dict)


@dataclass
class Graph:
    """Subgraph 0 of a TFLite model: enough to find a classifier head."""

    tensors: list[Tensor]
    operators: list[Operator]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    _buffers: list[_Table]
    _buf: _Buf

    def read_from(self, data: bytes) -> None:
        """Read constants from `data` from now on: the model as prepared to run (tflite_graph's
        writers keep every byte the graph reads in its place), so that a process holds one copy
        of the model, the one its interpreter runs, not two."""
        if len(data) < self._buf.size or data[:8] != self._buf.data[:8]:
            raise ValueError("not a copy of this graph's model")
        self._buf.data = memoryview(data)
        self._buf.size = len(data)

    def producer(self, tensor: int) -> Operator | None:
        for op in self.operators:
            if tensor in op.outputs:
                return op
        return None

    def consumers(self, tensor: int) -> list[Operator]:
        return [op for op in self.operators if tensor in op.inputs]

    def constant(self, tensor: int, copy: bool = True) -> np.ndarray | None:
        """The raw stored value of a constant tensor, or None if it is computed. `copy=False`: a
        read-only view into the model's bytes, which it keeps alive (no second copy of big weights)."""
        t = self.tensors[tensor]
        if t.buffer <= 0 or t.buffer >= len(self._buffers) or t.dtype is None:
            return None
        buf = self._buffers[t.buffer]
        raw = buf.vector(0, "u1")
        if raw.size == 0:
            # Models over 2 GB keep data outside the flatbuffer (offset, size).
            offset, size = int(buf.scalar(1, "Q")), int(buf.scalar(2, "Q"))
            if offset <= 1 or size == 0:
                return None
            self._buf._check(offset, size)
            raw = np.frombuffer(self._buf.data, dtype=np.uint8, count=size, offset=offset)
        dtype = np.dtype(t.dtype).newbyteorder("<")
        arr = np.frombuffer(raw.tobytes(), dtype=dtype) if copy else raw.view(dtype)
        return arr.reshape(t.shape) if t.shape else arr


_OPTION_FIELDS = {
    # builtin options we read, by operator: (field index, name, struct format)
    "AVERAGE_POOL_2D": [
        (0, "padding", "b"),
        (1, "stride_w", "i"),
        (2, "stride_h", "i"),
        (3, "filter_width", "i"),
        (4, "filter_height", "i"),
        (5, "activation", "b"),
    ],
    "CONV_2D": [(0, "padding", "b"), (1, "stride_w", "i"), (2, "stride_h", "i"), (3, "activation", "b")],
    "FULLY_CONNECTED": [(0, "activation", "b"), (2, "keep_num_dims", "b")],
    "MEAN": [(0, "keep_dims", "b")],
}


def parse(data: bytes | bytearray | memoryview) -> Graph:
    """Read subgraph 0 of a TFLite flatbuffer."""
    buf = _Buf(data)
    if buf.size < 8:
        raise GraphFormatError(f"only {buf.size} bytes: not a TFLite model")
    if bytes(buf.data[4:8]) != b"TFL3":
        raise GraphFormatError("no TFL3 file identifier: not a TFLite model")
    try:
        model = _Table(buf, buf.u32(0))
        codes = []
        for oc in model.tables(1):
            deprecated = int(oc.scalar(0, "b"))
            builtin = int(oc.scalar(3, "i"))
            codes.append(max(deprecated, builtin))
        subgraphs = model.tables(2)
        if not subgraphs:
            raise GraphFormatError("the model has no subgraph")
        sg = subgraphs[0]
        buffers = model.tables(4)
        tensors = []
        for i, t in enumerate(sg.tables(0)):
            q = t.table(4)
            if q is not None:
                quant = Quantization(
                    scale=q.vector(2, "f4").copy(),
                    zero_point=q.vector(3, "i8").copy(),
                    axis=int(q.scalar(6, "i")),
                )
            else:
                quant = Quantization(np.zeros(0, np.float32), np.zeros(0, np.int64), 0)
            tensors.append(
                Tensor(
                    index=i,
                    name=t.string(3),
                    shape=tuple(int(d) for d in t.vector(0, "i4")),
                    dtype=TENSOR_TYPES.get(int(t.scalar(1, "b"))),
                    buffer=int(t.scalar(2, "I")),
                    quant=quant,
                )
            )
        operators = []
        for i, o in enumerate(sg.tables(3)):
            idx = int(o.scalar(0, "I"))
            if idx >= len(codes):
                raise GraphFormatError(f"operator {i} names opcode {idx}, the model has {len(codes)}")
            name = OP_NAMES.get(codes[idx], f"OP_{codes[idx]}")
            options: dict[str, int] = {}
            opt = o.table(4)
            if opt is not None:
                for fidx, key, fmt in _OPTION_FIELDS.get(name, []):
                    options[key] = int(opt.scalar(fidx, fmt))
            operators.append(
                Operator(
                    index=i,
                    op=name,
                    inputs=tuple(int(v) for v in o.vector(1, "i4")),
                    outputs=tuple(int(v) for v in o.vector(2, "i4")),
                    options=options,
                )
            )
        return Graph(
            tensors=tensors,
            operators=operators,
            inputs=tuple(int(v) for v in sg.vector(1, "i4")),
            outputs=tuple(int(v) for v in sg.vector(2, "i4")),
            _buffers=buffers,
            _buf=buf,
        )
    except (struct.error, IndexError, ValueError) as exc:
        if isinstance(exc, GraphFormatError):
            raise
        raise GraphFormatError(f"malformed flatbuffer ({exc})") from exc


def with_outputs(data: bytes, extra: list[int]) -> bytes:
    """The same model with `extra` tensors appended to subgraph 0's outputs.

    The new output vector is appended at the end of the file and the subgraph's
    offset to it is patched; every other byte stays where it was, so constant
    buffers (including any stored past the flatbuffer) are untouched. Flatbuffer
    offsets are unsigned and point forward, which an appended vector satisfies.
    """
    graph = parse(data)
    outputs = list(graph.outputs) + [t for t in extra if t not in graph.outputs]
    if outputs == list(graph.outputs):
        return bytes(data)
    buf = _Buf(data)
    model = _Table(buf, buf.u32(0))
    sg = model.tables(2)[0]
    field_pos = sg.field_pos(2)  # the uoffset to the outputs vector
    if field_pos is None:
        raise GraphFormatError("subgraph 0 has no outputs field to extend")
    pad = (-len(data)) % 16
    vec_pos = len(data) + pad
    vector = struct.pack(f"<I{len(outputs)}i", len(outputs), *outputs)
    vector += b"\0" * ((-(vec_pos + len(vector))) % 16)
    return _patched(data, {field_pos: struct.pack("<I", vec_pos - field_pos)}, b"\0" * pad + vector)


def _patched(data: bytes, patches: dict[int, bytes], tail: bytes = b"") -> bytes:
    """`data` with the bytes at each position replaced and `tail` appended, made in one allocation:
    a model is megabytes, and a board with 512 MB should not hold three copies of it at once."""
    view = memoryview(data)
    pieces: list[bytes | memoryview] = []
    at = 0
    for pos, new in sorted(patches.items()):
        pieces += [view[at:pos], new]
        at = pos + len(new)
    pieces += [view[at:], tail]
    return b"".join(pieces)


def repair_quantized_dimensions(data: bytes) -> tuple[bytes, list[int]]:
    """The model with every quantized_dimension past its tensor's rank set to 0, and which tensors.

    Older converters (TFLite Micro's person_detect) gave 1-D per-channel biases the axis of their
    4-D weights (3); TFLite Micro never checks it, but the TFLite interpreter refuses the whole model.
    For a 1-D tensor axis 0 is the only one it can mean. The fix overwrites four bytes in place.
    """
    graph = parse(data)
    buf = _Buf(data)
    model = _Table(buf, buf.u32(0))
    patches: dict[int, bytes] = {}
    fixed: list[int] = []
    for sg_index, sg in enumerate(model.tables(2)):
        for i, t in enumerate(sg.tables(0)):
            q = t.table(4)
            pos = q.field_pos(6) if q is not None else None
            if pos is None:
                continue
            rank = len(t.vector(0, "i4"))
            if rank and buf.i32(pos) >= rank:
                patches[pos] = struct.pack("<i", 0)
                if sg_index == 0:
                    fixed.append(i)
    del graph  # parsed first so that a malformed model fails here, with the reader's message
    return (_patched(data, patches) if patches else data), fixed
