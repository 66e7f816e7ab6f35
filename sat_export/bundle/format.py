"""The bundle format, owned here: file names, ``manifest.json`` written and read, checksums, the seal.

A bundle is a folder: ``encoder.onnx``, ``decoder_step.onnx`` (plus ``*.fp16.onnx``,
``encoder.int8.onnx``, ``*.plan``, ``timing.cache`` and ``encoder.openvino-int8.xml/.bin`` when
built) and ``manifest.json``. The manifest lists every file with its size and sha256 (a graph's
external-data files too, and a graph pointing to one that is not listed is refused), and carries
its own sha256 (computed with that field empty); it must also be byte-for-byte the canonical JSON
this module writes. So any changed byte of a graph or of the manifest is refused, with a message
naming the file.

The seal is an unkeyed hash: it proves integrity (nothing changed by accident since the manifest
was written), not authenticity (whoever edits a bundle can reseal it). A bundle from someone else
is therefore read as untrusted input: the manifest is checked against one typed schema
(``manifest_schema``) and no file is read through a symlink, or unless it is a regular file in
the bundle folder itself.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import torch
from pydantic import ValidationError

import sat_export
from engines.contract import DECODER_STEP, ENCODER, GRAPHS, GraphSpec
from sat_export.bundle.schema import Manifest, in_folder
from sat_export.errors import BundleError
from training.config import ModelConfig, first_error
from training.errors import clip
from training.files import write_atomically
from training.vocab import Vocab

MANIFEST_FILE = "manifest.json"
BUNDLE_FORMAT = "sat-bundle"
BUNDLE_VERSION = 2  # 2: the decoder step takes k rows (beams) per image and reads each image's features once
TIMING_CACHE = "timing.cache"  # TensorRT's, reused across builds
DIGEST_KEY = "manifest_sha256"


@dataclass(frozen=True)
class Bundle:
    """A loaded, checksum-verified bundle."""

    dir: Path
    manifest: dict
    config: ModelConfig
    vocab: Vocab

    @property
    def precisions(self) -> list[str]:
        return list(self.manifest["precisions"])

    def graph_paths(self, precision: str = "fp32") -> tuple[Path, Path]:
        """``(encoder, decoder_step)`` ONNX paths of ``precision`` (fp32, fp16 or int8)."""
        graphs = self.manifest["precisions"].get(precision)
        if graphs is None:
            flag = "int8-encoder --calib DIR" if precision == "int8" else precision
            raise BundleError(f"{self.dir}: no {precision} graphs in this bundle (it has "
                              f"{', '.join(self.precisions)}); rebuild with `sat-export build --{flag}`")
        return self.dir / graphs[ENCODER.name], self.dir / graphs[DECODER_STEP.name]

    def engine_paths(self) -> tuple[Path, Path, dict]:
        """``(encoder.plan, decoder_step.plan, built_with)``; ``built_with`` has ``tensorrt`` and ``gpu``."""
        trt = self.manifest.get("tensorrt")
        if not trt:
            raise BundleError(f"{self.dir}: no TensorRT engines in this bundle; build them with "
                              "`sat-export build --trt`")
        return self.dir / trt["files"][ENCODER.name], self.dir / trt["files"][DECODER_STEP.name], trt

    def openvino_int8_path(self) -> Path:
        """The NNCF int8 encoder's IR graph (``.xml``, its weights beside it); ``BundleError`` without one."""
        entry = self.manifest.get("openvino_int8")
        if not entry:
            raise BundleError(f"{self.dir}: no OpenVINO int8 encoder in this bundle; quantise one with "
                              "sat_export.quantize.openvino.quantize_openvino_encoder (sat-bench does)")
        return self.dir / entry["encoder"]


def openvino_files(xml: str) -> list[str]:
    """An OpenVINO IR's two files: the graph (``.xml``) and the weights OpenVINO reads beside it (``.bin``)."""
    return [xml, str(Path(xml).with_suffix(".bin"))]


def graph_file(spec: GraphSpec, precision: str = "fp32", suffix: str = ".onnx") -> str:
    """File name of a graph in the bundle: ``encoder.onnx``, ``encoder.fp16.onnx``, ``encoder.plan``."""
    stem = Path(spec.file).stem
    return f"{stem}{suffix}" if precision == "fp32" else f"{stem}.{precision}{suffix}"


def open_regular(path: Path, follow: bool = True) -> BinaryIO:
    """``path`` opened for reading if it is a regular file (a FIFO or device would block or never end);
    with ``follow=False``, not through a symlink either. Refused before a byte is read, as ``BundleError``."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        f = os.fdopen(os.open(path, flags), "rb")
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None
    except OSError as err:
        link = err.errno == errno.ELOOP and not follow
        raise BundleError(f"{path}: a symlink; a bundle holds its own files, not links" if link
                          else f"{path}: cannot read ({err.strerror})") from None
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise BundleError(f"{path}: not a regular file")
    return f


def sha256(path: Path) -> str:
    """sha256 of a regular file (``open_regular``)."""
    with open_regular(path) as f:
        return _sha256(f)


def _sha256(f: BinaryIO) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript

    return {"sat_export": sat_export.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__,
            "python": platform.python_version()}


def io_table(config: ModelConfig) -> dict:
    """The contract's graphs with this model's sizes: names, dtypes, shapes (batch symbolic)."""
    dims = config.dims()
    return {g.name: {kind: [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape(dims))} for t in tensors]
                     for kind, tensors in (("inputs", g.inputs), ("outputs", g.outputs))} for g in GRAPHS}


def new_manifest(config: ModelConfig, vocab: Vocab, opset: int) -> dict:
    """A manifest body for a model; ``precisions``, ``parity`` and ``files`` are filled by the build."""
    cfg = config.to_dict()
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "created": created, "model": cfg,
            "vocab": {"itos": list(vocab.itos)}, "special_ids": vocab.special_ids(), "preprocess": cfg["preprocess"],
            "opset": opset, "graphs": io_table(config), "precisions": {}, "parity": {}, "tools": tool_versions(),
            "files": {}, DIGEST_KEY: ""}


def referenced_files(manifest: dict) -> list[str]:
    """Every file the manifest points to: graphs of each precision, TensorRT engines and cache, OpenVINO IR."""
    names = [f for graphs in manifest["precisions"].values() for f in graphs.values()]
    trt = manifest.get("tensorrt") or {}
    names += list(trt.get("files", {}).values()) + ([trt["timing_cache"]] if trt.get("timing_cache") else [])
    names += openvino_files(manifest["openvino_int8"]["encoder"]) if manifest.get("openvino_int8") else []
    return sorted(set(names))


def external_data_files(graph: Path) -> list[str]:
    """The files whose bytes ``graph`` (an ONNX model) keeps outside itself (``external_data`` locations).

    ONNX Runtime reads them beside the graph, so the seal must cover them too. Read without loading them;
    a file that is not an ONNX model has none (the runtimes refuse it when they load it).
    """
    import onnx

    try:
        model = onnx.load_model(str(graph), load_external_data=False)
    except Exception:  # noqa: BLE001 - protobuf raises its own types on a damaged file
        return []
    names = set()
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names.update(entry.value for entry in tensor.external_data if entry.key == "location")
    return sorted(names)


def _tensors(graph) -> Iterator:
    """Every tensor stored in ``graph``: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            yield from ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def sealed_files(bundle_dir: Path, manifest: dict) -> list[str]:
    """``referenced_files`` and the external-data files of its ONNX graphs: every byte a bundle's runtimes read."""
    names = referenced_files(manifest)
    external = {x for n in names if n.endswith(".onnx") for x in external_data_files(bundle_dir / n)}
    return sorted(set(names) | {x for x in external if in_folder(x)})  # a path elsewhere is refused at load


def _render(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode()


def _digest(manifest: dict) -> str:
    return hashlib.sha256(_render({**manifest, DIGEST_KEY: ""})).hexdigest()


def write_manifest(bundle_dir: str | Path, manifest: dict) -> Path:
    """Hash every referenced file, seal the manifest with its own digest and write it atomically."""
    bundle_dir = Path(bundle_dir)
    manifest["files"] = {name: {"bytes": (bundle_dir / name).stat().st_size, "sha256": sha256(bundle_dir / name)}
                         for name in sealed_files(bundle_dir, manifest)}
    manifest[DIGEST_KEY] = _digest(manifest)
    path = bundle_dir / MANIFEST_FILE
    return write_atomically(path, lambda f: f.write(_render(manifest)))


def read_manifest(bundle_dir: str | Path) -> dict:
    """``manifest.json``, its seal (digest and canonical form) verified and the whole of it checked
    against ``manifest_schema.Manifest``; refused (``BundleError`` naming the field) before use."""
    return _read_manifest(Path(bundle_dir))[0]


def _read_manifest(bundle_dir: Path) -> tuple[dict, Manifest]:
    path = bundle_dir / MANIFEST_FILE
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: bundle folder not found")
    links = sorted(entry.name for entry in os.scandir(bundle_dir) if entry.is_symlink())
    if links:
        raise BundleError(f"{bundle_dir / links[0]}: a symlink; a bundle holds its own files, not links")
    if not os.path.lexists(path):
        raise BundleError(f"{path}: not found; is {bundle_dir} a bundle? Build one with `sat-export build --ckpt CKPT`")
    with open_regular(path, follow=False) as f:
        raw = f.read()
    try:
        manifest = json.loads(raw.decode())
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        reason = "nested too deeply" if isinstance(err, RecursionError) else clip(str(err), 160)
        raise BundleError(f"{path}: not valid JSON ({reason}); the manifest is corrupt or truncated") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: not a sat-export bundle manifest (format must be {BUNDLE_FORMAT!r})")
    version = manifest.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version > BUNDLE_VERSION:
        raise BundleError(f"{path}: bundle version {version} is newer than this tool reads ({BUNDLE_VERSION})")
    if isinstance(version, int) and not isinstance(version, bool) and version < BUNDLE_VERSION:
        raise BundleError(f"{path}: bundle version {version}, made by an older sat-export whose decoder step takes one "
                          f"image's features per row; this tool reads version {BUNDLE_VERSION}: build the bundle "
                          "again with `sat-export build --ckpt CKPT` (sat-infer rebuilds its cached ones itself)")
    if manifest.get(DIGEST_KEY) != _digest(manifest) or _render(manifest) != raw:
        raise BundleError(f"{path}: manifest was modified after it was written (its sha256 or layout does not match)")
    try:
        return manifest, Manifest.model_validate_json(raw)
    except ValidationError as err:
        raise BundleError(f"{path}: manifest {first_error(err)}") from None


def verify_files(bundle_dir: Path, manifest: dict) -> None:
    """Every referenced file, and every external-data file of its graphs, is listed; each listed file is a
    regular file in the folder (not a link), of the recorded size and sha256."""
    listed = manifest["files"]
    for name in referenced_files(manifest):
        if name not in listed:
            raise BundleError(f"{bundle_dir / name}: used by the manifest but has no checksum entry")
    for name, entry in listed.items():
        path = bundle_dir / name
        with open_regular(path, follow=False) as f:
            size = os.fstat(f.fileno()).st_size
            if size != entry["bytes"]:
                raise BundleError(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
            if _sha256(f) != entry["sha256"]:
                raise BundleError(f"{path}: sha256 does not match the manifest (the file was modified or is corrupt)")
    for name in referenced_files(manifest):  # sealed graphs, so what they point to is what was sealed
        for external in external_data_files(bundle_dir / name) if name.endswith(".onnx") else ():
            if external not in listed:
                raise BundleError(f"{bundle_dir / name}: keeps weights in {external!r}, which has no checksum entry "
                                  "in the manifest (every file a graph reads must be sealed)")


def load_bundle(bundle_dir: str | Path) -> Bundle:
    """Read a bundle: manifest seal and schema, file checksums, config, vocabulary, I/O table.

    Raises ``BundleError`` naming the offending file (and field).
    """
    bundle_dir = Path(bundle_dir)
    manifest, parsed = _read_manifest(bundle_dir)
    mpath = bundle_dir / MANIFEST_FILE
    verify_files(bundle_dir, manifest)
    config = parsed.model
    try:
        vocab = Vocab(parsed.vocab.itos)
    except ValueError as err:
        raise BundleError(f"{mpath}: invalid vocabulary ({err})") from None
    if len(vocab) != config.vocab_size or manifest["special_ids"] != vocab.special_ids():
        raise BundleError(f"{mpath}: vocabulary ({len(vocab)} words, specials {manifest['special_ids']}) "
                          f"does not match the model (vocab_size={config.vocab_size}, specials {vocab.special_ids()})")
    if parsed.preprocess != config.preprocess:  # parsed: a field left out holds its default
        raise BundleError(f"{mpath}: 'preprocess' differs from the model config's preprocessing")
    if manifest["graphs"] != io_table(config):
        raise BundleError(f"{mpath}: graph I/O table does not match the graph contract for this model config")
    if "fp32" not in manifest["precisions"]:
        raise BundleError(f"{mpath}: no fp32 graphs listed under 'precisions'")
    return Bundle(bundle_dir, manifest, config, vocab)
