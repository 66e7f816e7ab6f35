"""Importers: foreign Show-Attend-Tell checkpoints -> this project's checkpoint format, once.

Two layouts are understood:

- the seed project's plain ``state_dict`` (``encoder.resnet.*``, ``decoder.attention.features_fc``
  / ``hidden_state_fc`` / ``attention_score_fc``, ``decoder.lstm_cell``, ``decoder.init_h`` ...;
  tanh attention, no gate although an unused ``f_beta`` is saved), with the vocabulary rebuilt
  from its captions file exactly as the seed built it;
- sgrvinod's ``BEST_checkpoint_*.pth.tar`` (pickled ``Encoder`` / ``DecoderWithAttention``
  modules: ``attention.encoder_att`` / ``decoder_att`` / ``full_att``, ``decode_step`` LSTMCell,
  ``f_beta`` gate, ReLU attention) with its ``WORDMAP_*.json``. Unpickling runs code, so it
  needs ``trust_pickle=True``; the classes need not be importable (stand-ins receive the state).

Dimensions come from weight shapes, the ResNet depth from the number of blocks per stage.

Each importer records the preprocessing its source project fed the encoder (``SEED_PREPROCESS``,
``SGRVINOD_PREPROCESS``), so an imported model sees the pixels it was trained on. One deliberate
deviation from both projects: ``training.images.load_rgb`` applies the EXIF orientation (phone photos
come out upright; both projects fed them sideways). It also reads images they could not: alpha is
composited on white (sgrvinod's ``caption.py`` fails on RGBA, the seed's ``convert("RGB")`` drops it)
and 16-bit greyscale is scaled by its full range (SciPy's ``imread`` path scales by the image's min..max).
"""
from __future__ import annotations

import csv
import json
import pickle
import re
import types
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

from training.checkpoint import is_truncated, load_reason, read_payload, save_checkpoint
from training.config import ModelConfig, PreprocessConfig
from training.errors import CheckpointError
from training.model import ShowAttendTell
from training.vocab import SPECIALS, Vocab

# (blocks per stage, bottleneck blocks) -> torchvision ResNet
RESNETS = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34", ((3, 4, 6, 3), True): "resnet50",
           ((3, 4, 23, 3), True): "resnet101", ((3, 8, 36, 3), True): "resnet152"}
SEED_KEYS = {"encoder.resnet.": "backbone.", "decoder.attention.features_fc.": "attention.enc_att.",
             "decoder.attention.hidden_state_fc.": "attention.dec_att.",
             "decoder.attention.attention_score_fc.": "attention.full_att.", "decoder.lstm_cell.": "lstm.",
             "decoder.": ""}
# BrunoKreiner/show-attend-tell notebooks/train.ipynb (commit 29d4b7c4, cells 7-8): Image.open(p).convert("RGB"),
# T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(ImageNet mean, std).
SEED_PREPROCESS = PreprocessConfig(resize=256, crop=224, resize_mode="torchvision", reducing_gap=None,
                                   draft_margin=None)
# sgrvinod caption.py (commit cc9c7e2f) lines 32-43: imread, imresize(img, (256, 256)) = Pillow BILINEAR resize
# of the whole image, no crop; /255, ImageNet mean/std.
SGRVINOD_PREPROCESS = PreprocessConfig(resize=256, crop=256, resize_mode="squash", reducing_gap=None,
                                       draft_margin=None)
SGRVINOD_KEYS = {"encoder.resnet.": "backbone.", "decoder.attention.encoder_att.": "attention.enc_att.",
                 "decoder.attention.decoder_att.": "attention.dec_att.",
                 "decoder.attention.full_att.": "attention.full_att.", "decoder.decode_step.": "lstm.",
                 "decoder.": ""}


def resnet_name(state_dict: dict[str, Tensor], prefix: str, source: Path) -> str:
    """torchvision ResNet name from the blocks of ``prefix``4..7 (layer1..layer4) in a state_dict."""
    blocks = tuple(len({k[len(prefix):].split(".")[1] for k in state_dict if k.startswith(f"{prefix}{stage}.")})
                   for stage in (4, 5, 6, 7))
    bottleneck = f"{prefix}4.0.conv3.weight" in state_dict
    if (blocks, bottleneck) not in RESNETS:
        raise CheckpointError(f"{source}: backbone with {blocks} blocks per stage is not a known torchvision ResNet")
    return RESNETS[(blocks, bottleneck)]


def rename(state_dict: dict[str, Tensor], mapping: dict[str, str], drop: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """Rename keys by the first matching prefix of ``mapping``; keys starting with ``drop`` are left out."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(drop):
            continue
        old = next((p for p in mapping if key.startswith(p)), None)
        out[mapping[old] + key[len(old):] if old is not None else key] = value
    return out


def infer_config(sd: dict[str, Tensor], backbone: str, source: Path, **fixed) -> ModelConfig:
    """Sizes from weight shapes of a state_dict already in this project's names."""
    try:
        dec_dim, enc_dim = sd["init_h.weight"].shape
        vocab_size, emb_dim = sd["embedding.weight"].shape
        att_dim = sd["attention.enc_att.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"{source}: no {err} weight: not the layout this importer reads") from None
    try:
        return ModelConfig(vocab_size=vocab_size, backbone=backbone, enc_dim=enc_dim, att_dim=att_dim,
                           dec_dim=dec_dim, emb_dim=emb_dim, **fixed)
    except ValueError as err:
        raise CheckpointError(f"{source}: cannot infer a model config ({err})") from None


def build_model(config: ModelConfig, sd: dict[str, Tensor], source: Path) -> ShowAttendTell:
    """The model with these weights, or ``CheckpointError`` listing missing/unexpected/misshaped keys."""
    model = ShowAttendTell(config)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        first = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err))
        raise CheckpointError(
            f"{source}: weights do not fit the inferred {config.backbone} model ({first[:300]})") from None
    return model.eval()


# --- the seed project --------------------------------------------------------------------------
def seed_captions(path: str | Path) -> list[str]:
    """Caption strings of a Flickr8k ``*.token.txt`` (``img.jpg#0<TAB>caption``) or ``captions.txt`` CSV."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: captions file not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    if "\t" in text.split("\n", 1)[0]:
        return [row.split("#")[-1].split("\t")[-1] for row in text.split("\n")]
    rows = list(csv.reader(text.splitlines()))
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["image", "caption"]:
        raise CheckpointError(f"{path}: expected Flickr8k token lines or a CSV with an 'image,caption' header")
    return [",".join(r[1:]) for r in rows[1:] if r]


def seed_vocab(captions: list[str], freq_threshold: int) -> list[str]:
    """The seed's word order: cleaned like its notebook, a word enters when it reaches the threshold."""
    counts: Counter[str] = Counter()
    words = []
    for caption in captions:
        clean = re.sub("[^a-z]+", " ", caption.replace(".", "").lower())
        for word in (w for w in clean.split() if len(w) > 1):
            counts[word] += 1
            if counts[word] == freq_threshold:
                words.append(word)
    return [*SPECIALS, *words]


def import_seed(src: str | Path, captions: str | Path, out: str | Path, freq_threshold: int | None = None,
                preprocess: PreprocessConfig | None = None, grid: int = 14) -> Path:
    """Convert the seed project's ``state_dict`` + captions file into a sat-export checkpoint.

    ``freq_threshold`` None tries 1..20 and takes the one whose vocabulary size matches the
    embedding. ``preprocess`` defaults to the seed's own (``SEED_PREPROCESS``).
    """
    src = Path(src)
    raw = read_payload(src)
    if not isinstance(raw, dict) or not any(str(k).startswith("decoder.lstm_cell.") for k in raw):
        raise CheckpointError(f"{src}: not a seed-project state_dict (no 'decoder.lstm_cell.*' weights)")
    sd = rename(raw, SEED_KEYS, drop=("decoder.f_beta.",))  # f_beta is saved but never used by the seed
    config = infer_config(sd, resnet_name(raw, "encoder.resnet.", src), src, grid=grid, attention="tanh", gate=False,
                          dropout=0.3, preprocess=preprocess or SEED_PREPROCESS)
    texts = seed_captions(captions)
    thresholds = [freq_threshold] if freq_threshold else range(1, 21)
    itos = next((v for t in thresholds if len(v := seed_vocab(texts, t)) == config.vocab_size), None)
    if itos is None:
        sizes = ", ".join(f"{t}: {len(seed_vocab(texts, t))}" for t in list(thresholds)[:5])
        raise CheckpointError(f"{captions}: vocabulary sizes by --freq-threshold ({sizes}...) never match the "
                              f"checkpoint's {config.vocab_size} embedding rows: is this the captions file it was "
                              "trained on?")
    model = build_model(config, sd, src)
    return save_checkpoint(out, model, Vocab(itos), {"imported_from": "seed", "source": str(src)})


# --- sgrvinod's tutorial ----------------------------------------------------------------------
class _StandIn(nn.Module):
    """Receives the state of a pickled module whose class is not importable here."""

    def forward(self, *args):
        raise NotImplementedError("stand-in for an unpickled foreign module")


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _StandIn


_PICKLE = types.SimpleNamespace(Unpickler=_Unpickler, load=pickle.load, __name__="sat_export_pickle")


def load_sgrvinod(src: str | Path, trust_pickle: bool = False) -> dict:
    """Unpickle a ``BEST_checkpoint_*.pth.tar`` (only with ``trust_pickle``: it executes pickle).

    Tutorial-era files (torch < 1.6) hold each module class's source, which torch compares with the
    stand-in's and warns about (``SourceChangeWarning``): expected here, so silenced.
    """
    src = Path(src)
    if not trust_pickle:
        raise CheckpointError(f"{src}: sgrvinod checkpoints are pickled Python modules and loading one can execute "
                              "code; pass --trust-pickle if you trust where this file came from")
    if not src.is_file():
        raise CheckpointError(f"{src}: checkpoint file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
            ckpt = torch.load(src, map_location="cpu", weights_only=False, pickle_module=_PICKLE)
    except Exception as err:  # noqa: BLE001 - unpickling garbage raises arbitrary types
        if is_truncated(err):
            raise CheckpointError(f"{src}: the file is truncated ({load_reason(err)})") from None
        raise CheckpointError(f"{src}: cannot unpickle ({type(err).__name__}: {load_reason(err)})") from None
    if not isinstance(ckpt, dict) or not all(isinstance(ckpt.get(k), nn.Module) for k in ("encoder", "decoder")):
        raise CheckpointError(
            f"{src}: not an sgrvinod checkpoint (expected a dict with 'encoder' and 'decoder' modules)")
    return ckpt


def sgrvinod_vocab(wordmap: str | Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """This project's word list (specials first) and, per new id, the sgrvinod id it came from."""
    wordmap = Path(wordmap)
    try:
        word_map = json.loads(wordmap.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{wordmap}: cannot read the word map ({err})") from None
    if not isinstance(word_map, dict) or sorted(word_map.values()) != list(range(vocab_size)):
        raise CheckpointError(
            f"{wordmap}: word ids are not 0..{vocab_size - 1} (the checkpoint has {vocab_size} words)")
    missing = [s for s in SPECIALS if s not in word_map]
    if missing:
        raise CheckpointError(f"{wordmap}: word map lacks {missing}")
    others = sorted((i, w) for w, i in word_map.items() if w not in SPECIALS)
    itos = [*SPECIALS, *(w for _, w in others)]
    return itos, [word_map[w] for w in itos]


def import_sgrvinod(src: str | Path, wordmap: str | Path, out: str | Path, trust_pickle: bool = False,
                    preprocess: PreprocessConfig | None = None) -> Path:
    """Convert sgrvinod's checkpoint + word map; vocabulary rows are reordered to put specials first.

    ``preprocess`` defaults to upstream's own (``SGRVINOD_PREPROCESS``: the whole image squashed to
    256x256, no crop), so greedy captions equal ``caption.py``'s at beam 1, photos of any shape.
    """
    src = Path(src)
    ckpt = load_sgrvinod(src, trust_pickle)
    raw = {f"{part}.{k}": v for part in ("encoder", "decoder") for k, v in ckpt[part].state_dict().items()}
    sd = rename(raw, SGRVINOD_KEYS)
    dropout = getattr(getattr(ckpt["decoder"], "dropout", None), "p", 0.5)
    grid = int(getattr(ckpt["encoder"], "enc_image_size", 14))
    config = infer_config(sd, resnet_name(raw, "encoder.resnet.", src), src, grid=grid, attention="relu", gate=True,
                          dropout=dropout, preprocess=preprocess or SGRVINOD_PREPROCESS)
    itos, old_ids = sgrvinod_vocab(wordmap, config.vocab_size)
    order = torch.tensor(old_ids)
    for key in ("embedding.weight", "fc.weight", "fc.bias"):
        sd[key] = sd[key][order]
    model = build_model(config, sd, src)
    record = {k: ckpt[k] for k in ("epoch", "bleu-4") if isinstance(ckpt.get(k), (int, float))}
    return save_checkpoint(out, model, Vocab(itos), {"imported_from": "sgrvinod", "source": str(src), **record})
