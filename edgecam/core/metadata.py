"""TFLite model metadata: the input normalisation and the label file a model carries with it.

Models made by TFLite Model Maker, TF Hub and AutoML keep a `TFLITE_METADATA` buffer (a second
flatbuffer, file identifier "M001", tensorflow_lite_support/metadata/metadata_schema.fbs) and
append their associated files as a zip archive, so the .tflite is also a zip holding labels.txt.
Field numbers follow that schema, which, like the model schema, only grows.
"""

from __future__ import annotations

import io
import logging
import zipfile
import zlib
from dataclasses import dataclass

from edgecam.core.errors import EdgecamError
from edgecam.core.labels import parse_labels
from edgecam.core.tflite_graph import GraphFormatError, _Buf, _Table

log = logging.getLogger(__name__)

_NORMALIZATION_OPTIONS = 1  # ProcessUnitOptions union member
_TENSOR_AXIS_LABELS = 2  # AssociatedFileType


@dataclass(frozen=True)
class ModelMetadata:
    mean: tuple[float, ...] | None = None  # NormalizationOptions of the input image, in pixel units
    std: tuple[float, ...] | None = None
    labels: list[str] | None = None  # the output's TENSOR_AXIS_LABELS file, one label a line
    labels_name: str = ""
    name: str = ""


def read_metadata(data: bytes) -> ModelMetadata:
    """What the model's metadata says; an empty ModelMetadata when it has none or it cannot be read.

    Metadata is a convenience: a damaged one is logged and ignored, never a reason to refuse a model
    whose graph is fine.
    """
    try:
        return _read(data)
    except (GraphFormatError, ValueError, IndexError, zipfile.BadZipFile, UnicodeDecodeError, EOFError,
            NotImplementedError, zlib.error, OSError) as exc:
        # zipfile raises EOFError, NotImplementedError (an unknown compression) and zlib.error on damage.
        log.warning("model metadata unreadable, ignored: %s", exc)
        return ModelMetadata()


def _read(data: bytes) -> ModelMetadata:
    buf = _Buf(data)
    model = _Table(buf, buf.u32(0))
    blob = None
    buffers = model.tables(4)
    for md in model.tables(6):
        if md.string(0) == "TFLITE_METADATA":
            index = int(md.scalar(1, "I"))
            if 0 < index < len(buffers):
                blob = buffers[index].vector(0, "u1").tobytes()
    if not blob or blob[4:8] != b"M001":
        return ModelMetadata()
    mb = _Buf(blob)
    meta = _Table(mb, mb.u32(0))
    mean = std = None
    label_file = ""
    subgraphs = meta.tables(3)
    if subgraphs:
        sg = subgraphs[0]
        inputs = sg.tables(2)
        for unit in inputs[0].tables(4) if inputs else []:
            if int(unit.scalar(0, "B")) == _NORMALIZATION_OPTIONS:
                options = unit.table(1)
                if options is not None:
                    mean = tuple(float(v) for v in options.vector(0, "f4"))
                    std = tuple(float(v) for v in options.vector(1, "f4"))
        for out in sg.tables(3)[:1]:
            for f in out.tables(6):
                if int(f.scalar(2, "b")) == _TENSOR_AXIS_LABELS and not label_file:
                    label_file = f.string(0)
    labels = _zipped_labels(data, label_file) if label_file else None
    if not mean or not std:
        mean = std = None
    return ModelMetadata(mean, std, labels, label_file if labels else "", meta.string(0))


def _zipped_labels(data: bytes, name: str) -> list[str] | None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            if name not in z.namelist():
                return None
            info = z.getinfo(name)
            if info.file_size > 16 << 20:
                return None  # a label file is small; refuse to inflate anything else
            text = z.read(name).decode("utf-8")
    except zipfile.BadZipFile:
        return None
    try:
        return parse_labels(text, name)
    except EdgecamError:
        return None
