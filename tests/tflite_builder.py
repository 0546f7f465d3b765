"""Small TFLite models built in the tests, with the `flatbuffers` package (no TensorFlow).

Field numbers follow tensorflow/lite/schema/schema.fbs, as edgecam's reader does. A model is a
list of constant and computed tensors and a list of operators; `build` lays them out as a real
.tflite flatbuffer that the TFLite interpreter loads and runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import flatbuffers
import numpy as np

# BuiltinOperator codes and their BuiltinOptions union members (schema.fbs).
OPS = {"AVERAGE_POOL_2D": 1, "CONV_2D": 3, "DEQUANTIZE": 6, "FULLY_CONNECTED": 9, "RELU": 19, "RESHAPE": 22,
       "SOFTMAX": 25, "TRANSPOSE": 39, "MEAN": 40, "SQUEEZE": 43, "QUANTIZE": 114}
OPTIONS = {"CONV_2D": 1, "AVERAGE_POOL_2D": 5, "FULLY_CONNECTED": 8, "SOFTMAX": 9, "RESHAPE": 17, "TRANSPOSE": 26,
           "MEAN": 27, "SQUEEZE": 30}
TYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(np.int32): 2, np.dtype(np.uint8): 3,
         np.dtype(np.int64): 4, np.dtype(np.int8): 9}
RELU, RELU6 = 1, 3
SAME, VALID = 0, 1


@dataclass
class Tensor:
    shape: tuple[int, ...]
    dtype: np.dtype
    data: np.ndarray | None = None
    scale: float | None = None
    zero_point: int = 0
    name: str = ""


@dataclass
class Op:
    code: str
    inputs: list[int]
    outputs: list[int]
    options: dict[str, object] = field(default_factory=dict)


@dataclass
class Model:
    tensors: list[Tensor] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)

    def tensor(self, shape: tuple[int, ...], dtype: type = np.float32, name: str = "", **kw: object) -> int:
        self.tensors.append(Tensor(tuple(shape), np.dtype(dtype), name=name or f"t{len(self.tensors)}", **kw))
        return len(self.tensors) - 1

    def const(self, value: np.ndarray, name: str = "") -> int:
        value = np.asarray(value)
        return self.tensor(value.shape, value.dtype, name, data=value)

    def op(self, code: str, inputs: list[int], out_shape: tuple[int, ...], dtype: type = np.float32,
           name: str = "", **options: object) -> int:
        out = self.tensor(out_shape, dtype, name)
        self.ops.append(Op(code, inputs, [out], options))
        return out


def _ints(b: flatbuffers.Builder, values: list[int]) -> int:
    return b.CreateNumpyVector(np.asarray(values, dtype=np.int32))


def _options(b: flatbuffers.Builder, op: Op) -> int | None:
    o = op.options
    if op.code == "CONV_2D":
        b.StartObject(6)
        b.PrependInt8Slot(0, int(o.get("padding", SAME)), 0)
        b.PrependInt32Slot(1, int(o.get("stride", 1)), 0)
        b.PrependInt32Slot(2, int(o.get("stride", 1)), 0)
        b.PrependInt8Slot(3, int(o.get("activation", 0)), 0)
        b.PrependInt32Slot(4, 1, 0)
        b.PrependInt32Slot(5, 1, 0)
        return b.EndObject()
    if op.code == "AVERAGE_POOL_2D":
        b.StartObject(6)
        b.PrependInt8Slot(0, VALID, 0)
        b.PrependInt32Slot(1, int(o["filter"][1]), 0)  # type: ignore[index]
        b.PrependInt32Slot(2, int(o["filter"][0]), 0)  # type: ignore[index]
        b.PrependInt32Slot(3, int(o["filter"][1]), 0)  # type: ignore[index]
        b.PrependInt32Slot(4, int(o["filter"][0]), 0)  # type: ignore[index]
        b.PrependInt8Slot(5, int(o.get("activation", 0)), 0)
        return b.EndObject()
    if op.code == "FULLY_CONNECTED":
        b.StartObject(4)
        b.PrependInt8Slot(0, int(o.get("activation", 0)), 0)
        return b.EndObject()
    if op.code == "SOFTMAX":
        b.StartObject(1)
        b.PrependFloat32Slot(0, 1.0, 0.0)
        return b.EndObject()
    if op.code == "MEAN":
        b.StartObject(1)
        b.PrependBoolSlot(0, bool(o.get("keep_dims", False)), False)
        return b.EndObject()
    if op.code == "RESHAPE":
        shape = _ints(b, list(o["shape"]))  # type: ignore[arg-type]
        b.StartObject(1)
        b.PrependUOffsetTRelativeSlot(0, shape, 0)
        return b.EndObject()
    if op.code == "SQUEEZE":
        dims = _ints(b, list(o.get("dims", [])))  # type: ignore[arg-type]
        b.StartObject(1)
        b.PrependUOffsetTRelativeSlot(0, dims, 0)
        return b.EndObject()
    if op.code == "TRANSPOSE":
        b.StartObject(0)
        return b.EndObject()
    return None


def build(model: Model) -> bytes:
    """The model as .tflite bytes."""
    b = flatbuffers.Builder(1 << 16)
    codes = list(dict.fromkeys(op.code for op in model.ops))
    # Buffers: 0 is the empty sentinel; each constant tensor gets its own.
    buffer_of: dict[int, int] = {}
    buffer_data: list[bytes] = [b""]
    for i, t in enumerate(model.tensors):
        if t.data is not None:
            buffer_of[i] = len(buffer_data)
            buffer_data.append(np.ascontiguousarray(t.data, dtype=t.dtype).astype(t.dtype.newbyteorder("<")).tobytes())
    buffers = []
    for raw in buffer_data:
        vec = None
        if raw:
            b.StartVector(1, len(raw), 16)
            for byte in reversed(raw):
                b.PrependUint8(byte)
            vec = b.EndVector()
        b.StartObject(1)
        if vec is not None:
            b.PrependUOffsetTRelativeSlot(0, vec, 0)
        buffers.append(b.EndObject())
    tensors = []
    for i, t in enumerate(model.tensors):
        name = b.CreateString(t.name)
        shape = _ints(b, list(t.shape))
        quant = None
        if t.scale is not None:
            scale = b.CreateNumpyVector(np.asarray([t.scale], np.float32))
            zp = b.CreateNumpyVector(np.asarray([t.zero_point], np.int64))
            b.StartObject(7)
            b.PrependUOffsetTRelativeSlot(2, scale, 0)
            b.PrependUOffsetTRelativeSlot(3, zp, 0)
            quant = b.EndObject()
        b.StartObject(6)
        b.PrependUOffsetTRelativeSlot(0, shape, 0)
        b.PrependInt8Slot(1, TYPES[t.dtype], -1)
        b.PrependUint32Slot(2, buffer_of.get(i, 0), 0)
        b.PrependUOffsetTRelativeSlot(3, name, 0)
        if quant is not None:
            b.PrependUOffsetTRelativeSlot(4, quant, 0)
        tensors.append(b.EndObject())
    operators = []
    for op in model.ops:
        ins, outs = _ints(b, op.inputs), _ints(b, op.outputs)
        options = _options(b, op)
        b.StartObject(5)
        b.PrependUint32Slot(0, codes.index(op.code), 0)
        b.PrependUOffsetTRelativeSlot(1, ins, 0)
        b.PrependUOffsetTRelativeSlot(2, outs, 0)
        if options is not None:
            b.PrependUint8Slot(3, OPTIONS[op.code], 0)
            b.PrependUOffsetTRelativeSlot(4, options, 0)
        operators.append(b.EndObject())
    opcodes = []
    for code in codes:
        b.StartObject(4)
        b.PrependInt8Slot(0, min(OPS[code], 127), 0)
        b.PrependInt32Slot(2, 1, 0)
        b.PrependInt32Slot(3, OPS[code], 0)
        opcodes.append(b.EndObject())

    def vector(offsets: list[int]) -> int:
        b.StartVector(4, len(offsets), 4)
        for off in reversed(offsets):
            b.PrependUOffsetTRelative(off)
        return b.EndVector()

    t_vec, o_vec = vector(tensors), vector(operators)
    in_vec, out_vec = _ints(b, model.inputs), _ints(b, model.outputs)
    sg_name = b.CreateString("main")
    b.StartObject(5)
    b.PrependUOffsetTRelativeSlot(0, t_vec, 0)
    b.PrependUOffsetTRelativeSlot(1, in_vec, 0)
    b.PrependUOffsetTRelativeSlot(2, out_vec, 0)
    b.PrependUOffsetTRelativeSlot(3, o_vec, 0)
    b.PrependUOffsetTRelativeSlot(4, sg_name, 0)
    subgraph = b.EndObject()
    codes_vec, sg_vec, buf_vec = vector(opcodes), vector([subgraph]), vector(buffers)
    desc = b.CreateString("edgecam test model")
    b.StartObject(5)
    b.PrependUint32Slot(0, 3, 0)
    b.PrependUOffsetTRelativeSlot(1, codes_vec, 0)
    b.PrependUOffsetTRelativeSlot(2, sg_vec, 0)
    b.PrependUOffsetTRelativeSlot(3, desc, 0)
    b.PrependUOffsetTRelativeSlot(4, buf_vec, 0)
    b.Finish(b.EndObject(), file_identifier=b"TFL3")
    return bytes(b.Output())
