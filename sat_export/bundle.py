"""The bundle on disk: ``manifest.json`` written and read, checksums, and ``sat-export check``.

A bundle is a folder: ``encoder.onnx``, ``decoder_step.onnx`` (plus ``*.fp16.onnx``,
``encoder.int8.onnx``, ``*.plan`` when built) and ``manifest.json``. The manifest lists every
file with its size and sha256, and carries its own sha256 (computed with that field empty);
it must also be byte-for-byte the canonical JSON this module writes. So any changed byte of a
graph or of the manifest is refused, with a message naming the file.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import sat_export
from sat_export.contract import BUNDLE_FORMAT, BUNDLE_VERSION, DECODER_STEP, ENCODER, GRAPHS, MANIFEST_FILE
from sat_export.errors import BackendUnavailable, BundleError, CheckpointError, ShapeError
from sat_export.export import check_graph_io
from training.config import ModelConfig
from training.vocab import Vocab

DIGEST_KEY = "manifest_sha256"
REQUIRED = {"format": str, "version": int, "model": dict, "vocab": dict, "special_ids": dict, "preprocess": dict,
            "opset": int, "graphs": dict, "precisions": dict, "parity": dict, "tools": dict, "files": dict,
            DIGEST_KEY: str}


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


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
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
    """Every file the manifest points to: graphs of each precision, TensorRT engines and cache."""
    names = [f for graphs in manifest["precisions"].values() for f in graphs.values()]
    trt = manifest.get("tensorrt") or {}
    names += list(trt.get("files", {}).values()) + ([trt["timing_cache"]] if trt.get("timing_cache") else [])
    return sorted(set(names))


def _render(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode()


def _digest(manifest: dict) -> str:
    return hashlib.sha256(_render({**manifest, DIGEST_KEY: ""})).hexdigest()


def write_manifest(bundle_dir: str | Path, manifest: dict) -> Path:
    """Hash every referenced file, seal the manifest with its own digest and write it atomically."""
    bundle_dir = Path(bundle_dir)
    manifest["files"] = {name: {"bytes": (bundle_dir / name).stat().st_size, "sha256": sha256(bundle_dir / name)}
                         for name in referenced_files(manifest)}
    manifest[DIGEST_KEY] = _digest(manifest)
    path = bundle_dir / MANIFEST_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(_render(manifest))
    tmp.replace(path)
    return path


def read_manifest(bundle_dir: str | Path) -> dict:
    """Parse and schema-check ``manifest.json``, verifying its own digest and canonical form."""
    path = Path(bundle_dir) / MANIFEST_FILE
    if not Path(bundle_dir).is_dir():
        raise BundleError(f"{bundle_dir}: bundle folder not found")
    if not path.is_file():
        raise BundleError(f"{path}: not found; is {bundle_dir} a bundle? Build one with `sat-export build --ckpt CKPT`")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: not valid JSON ({err}); the manifest is corrupt or truncated") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: not a sat-export bundle manifest (format must be {BUNDLE_FORMAT!r})")
    for key, kind in REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            raise BundleError(f"{path}: manifest field {key!r} is missing or not a {kind.__name__}")
    if manifest["version"] > BUNDLE_VERSION:
        raise BundleError(f"{path}: bundle version {manifest['version']} is newer than this tool reads "
                          f"({BUNDLE_VERSION})")
    if manifest[DIGEST_KEY] != _digest(manifest) or _render(manifest) != raw:
        raise BundleError(f"{path}: manifest was modified after it was written (its sha256 or layout does not match)")
    return manifest


def verify_files(bundle_dir: Path, manifest: dict) -> None:
    """Every referenced file is listed, present, of the recorded size and sha256."""
    listed = manifest["files"]
    for name in referenced_files(manifest):
        if name not in listed:
            raise BundleError(f"{bundle_dir / name}: used by the manifest but has no checksum entry")
    for name, entry in listed.items():
        path = bundle_dir / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{bundle_dir / MANIFEST_FILE}: file entry {name!r} points outside the bundle")
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise BundleError(f"{path}: {size} bytes, the manifest says {entry.get('bytes')} (truncated or replaced)")
        if sha256(path) != entry.get("sha256"):
            raise BundleError(f"{path}: sha256 does not match the manifest (the file was modified or is corrupt)")


def load_bundle(bundle_dir: str | Path) -> Bundle:
    """Read a bundle: manifest schema and digest, file checksums, config, vocabulary, I/O table.

    Raises ``BundleError`` naming the offending file.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    mpath = bundle_dir / MANIFEST_FILE
    verify_files(bundle_dir, manifest)
    try:
        config = ModelConfig.from_dict(manifest["model"], source=str(mpath))
        vocab = Vocab(manifest["vocab"]["itos"])
    except CheckpointError as err:
        raise BundleError(str(err)) from None
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"{mpath}: invalid vocabulary ({err})") from None
    if len(vocab) != config.vocab_size or manifest["special_ids"] != vocab.special_ids():
        raise BundleError(f"{mpath}: vocabulary ({len(vocab)} words, specials {manifest['special_ids']}) "
                          f"does not match the model (vocab_size={config.vocab_size}, specials {vocab.special_ids()})")
    if manifest["preprocess"] != manifest["model"]["preprocess"]:
        raise BundleError(f"{mpath}: 'preprocess' differs from the model config's preprocessing")
    if manifest["graphs"] != io_table(config):
        raise BundleError(f"{mpath}: graph I/O table does not match the graph contract for this model config")
    if "fp32" not in manifest["precisions"]:
        raise BundleError(f"{mpath}: no fp32 graphs listed under 'precisions'")
    return Bundle(bundle_dir, manifest, config, vocab)


def check_bundle(bundle_dir: str | Path, batch: int = 2) -> dict:
    """``sat-export check``: load the bundle, check each graph's I/O, run a smoke inference.

    Returns a summary (files checked, precisions run). TensorRT engines are checked for their
    GPU and TensorRT version only where TensorRT is available.
    """
    from engines.ort import OrtBackend

    bundle = load_bundle(bundle_dir)
    dims = bundle.config.dims()
    crop = bundle.config.preprocess.crop
    images = torch.randn(batch, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    for precision in bundle.precisions:
        encoder, decoder = bundle.graph_paths(precision)
        for spec, path in ((ENCODER, encoder), (DECODER_STEP, decoder)):
            check_graph_io(path, spec, dims)
        with OrtBackend(encoder, decoder, bundle.config, bundle.vocab) as ort, torch.inference_mode():
            _smoke(ort, images, bundle, encoder, decoder)
    summary = {"bundle": str(bundle_dir), "files": sorted(bundle.manifest["files"]), "precisions": bundle.precisions,
               "parity": {p: r.get("passed") for p, r in bundle.manifest["parity"].items()}}
    if bundle.manifest.get("tensorrt"):
        summary["tensorrt"] = _check_engines(bundle)
    return summary


def _smoke(ort, images, bundle: Bundle, encoder: Path, decoder: Path) -> None:
    dims = bundle.config.dims()
    try:
        enc = ort.encode(images)
        ENCODER.check_outputs(dict(zip(ENCODER.output_names, enc)), dims)
        tokens = torch.full((images.size(0),), bundle.vocab.start, dtype=torch.long)
        out = ort.step(tokens, enc[2], enc[3], enc[0], enc[1])
        DECODER_STEP.check_outputs(dict(zip(DECODER_STEP.output_names, out)), dims)
    except ShapeError as err:
        raise BundleError(f"{encoder.parent}: smoke inference: {err}") from None
    for path, tensors in ((encoder, enc), (decoder, out)):
        if not all(np.isfinite(t.numpy()).all() for t in tensors):
            raise BundleError(f"{path}: smoke inference produced NaN or Inf")


def _check_engines(bundle: Bundle) -> str:
    from sat_export.tensorrt_build import check_engines

    try:
        check_engines(bundle)
    except BackendUnavailable as err:
        return f"not checked: {err}"
    return "compatible with this GPU and TensorRT"
