"""The one typed schema of ``manifest.json``, applied once when a bundle is read (``bundle.read_manifest``).

A bundle may come from anyone, so every field is checked for its type before anything uses it:
strict types (no ``8.0`` for an int, no string for a number), no unknown keys where this tool
writes them all, file names that stay inside the bundle folder. The model's config and
preprocessing are ``training.config``'s own dataclasses (the schema checkpoints are read with);
graph names come from the contract (``engines.contract.GRAPHS``), whose tensor table the
manifest's ``graphs`` is compared with after this check.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from engines.contract import GRAPHS
from training.config import ModelConfig, PreprocessConfig

STRICT = ConfigDict(strict=True, extra="forbid")
OPEN = ConfigDict(strict=True, extra="allow")  # records whose details are for people (parity, int8, TensorRT, OpenVINO)


def in_folder(name: str) -> bool:
    """Whether ``name`` names a file of the bundle folder itself (not a path, not ``..``)."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0") and len(name.encode()) <= 255


def _file_name(name: str) -> str:
    if not in_folder(name):
        raise ValueError("must name a file of the bundle folder itself (this one points outside the bundle)")
    return name


FileName = Annotated[str, AfterValidator(_file_name)]
Sha256 = Annotated[str, Field(pattern="^[0-9a-f]{64}$")]
GraphFiles = create_model("GraphFiles", __config__=STRICT, **{g.name: (FileName, ...) for g in GRAPHS})


class FileEntry(BaseModel):
    model_config = STRICT
    bytes: int = Field(ge=0)
    sha256: Sha256


class VocabEntry(BaseModel):
    model_config = STRICT
    itos: list[str]


class ParityEntry(BaseModel):
    model_config = OPEN
    passed: bool | None


class TensorRTEntry(BaseModel):
    model_config = OPEN
    tensorrt: str
    gpu: str
    precision: str
    files: GraphFiles
    timing_cache: FileName | None = None


def _ir_file(name: str) -> str:
    if not name.endswith(".xml"):
        raise ValueError("must name an OpenVINO IR graph (.xml; its weights are the .bin beside it)")
    return name


class OpenVinoInt8Entry(BaseModel):
    """The NNCF int8 encoder (``sat_export.quantize.openvino``): its IR graph and the record of its quantisation."""

    model_config = OPEN
    encoder: Annotated[FileName, AfterValidator(_ir_file)]


class Manifest(BaseModel):
    """``manifest.json`` as ``bundle.new_manifest`` and the build write it."""

    model_config = STRICT
    format: Literal["sat-bundle"]
    version: int = Field(ge=1)
    created: str
    model: ModelConfig
    vocab: VocabEntry
    special_ids: dict[str, int]
    preprocess: PreprocessConfig
    opset: int = Field(ge=1)
    graphs: dict[str, Any]  # compared with bundle.io_table(model) as a whole
    precisions: dict[str, GraphFiles]
    parity: dict[str, ParityEntry]
    tools: dict[str, str]
    files: dict[FileName, FileEntry]
    int8: dict[str, Any] | None = None
    tensorrt: TensorRTEntry | None = None
    openvino_int8: OpenVinoInt8Entry | None = None
    manifest_sha256: Sha256
