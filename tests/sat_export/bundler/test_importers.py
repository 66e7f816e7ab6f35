"""Importers: small checkpoints in the seed's layout (stand-in modules with its module/parameter names) and
sgrvinod's (written by upstream's own code, tests/fixtures/sgrvinod_upstream.py) convert into models whose
outputs equal the source model's, with the source's preprocessing."""
import json
import warnings
import zipfile

import matplotlib.cbook
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from sat_export.bundler.importers import (SEED_PREPROCESS, SGRVINOD_PREPROCESS, import_seed, import_sgrvinod, resnet_name,
                                        seed_captions, seed_vocab)
from sat_export.cli.export import app
from tests.fixtures import sgrvinod_upstream as upstream_code
from training.checkpoint import load_checkpoint
from training.errors import CheckpointError
from training.images import preprocess
from training.vocab import SPECIALS

CAPTIONS = ["A dog runs on the grass .", "A black dog jumps .", "Two dogs play on the grass .", "A cat sleeps ."]


def _resnet18_trunk():
    return nn.Sequential(*list(torchvision.models.resnet18(weights=None).children())[:-2])


# --- the seed project (BrunoKreiner/show-attend-tell src/utils.py), reduced to what is saved and run ----------
class SeedEncoderCNN(nn.Module):
    def __init__(self, filter_size=14):
        super().__init__()
        self.resnet = _resnet18_trunk()
        self.adaptive_pool = nn.AdaptiveAvgPool2d((filter_size, filter_size))

    def forward(self, images):
        features = self.adaptive_pool(self.resnet(images)).permute(0, 2, 3, 1)
        return features.reshape(features.size(0), -1, features.size(-1))


class SeedAttention(nn.Module):
    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super().__init__()
        self.hidden_state_fc = nn.Linear(decoder_dim, attention_dim)
        self.features_fc = nn.Linear(encoder_dim, attention_dim)
        self.attention_score_fc = nn.Linear(attention_dim, 1)

    def forward(self, features, hidden_state):
        combined = torch.tanh(self.features_fc(features) + self.hidden_state_fc(hidden_state).unsqueeze(1))
        alpha = F.softmax(self.attention_score_fc(combined).squeeze(2), dim=1)
        return alpha, (features * alpha.unsqueeze(2)).sum(dim=1)


class SeedDecoderRNN(nn.Module):
    def __init__(self, embed_size, vocab_size, attention_dim, encoder_dim, decoder_dim):
        super().__init__()
        self.dropout = nn.Dropout(0.3)
        self.attention = SeedAttention(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)  # saved, never used
        self.lstm_cell = nn.LSTMCell(embed_size + encoder_dim, decoder_dim, bias=True)
        self.fc = nn.Linear(decoder_dim, vocab_size)

    def forward(self, features, captions):
        embeddings = self.embedding(captions)
        mean = features.mean(dim=1)
        h, c = self.init_h(mean), self.init_c(mean)
        preds, alphas = [], []
        for s in range(captions.size(1) - 1):
            alpha, context = self.attention(features, h)
            h, c = self.lstm_cell(torch.cat((embeddings[:, s], context), dim=1), (h, c))
            preds.append(self.fc(self.dropout(h)))
            alphas.append(alpha)
        return torch.stack(preds, 1), torch.stack(alphas, 1)


class SeedEncoderDecoder(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.encoder = SeedEncoderCNN()
        self.decoder = SeedDecoderRNN(24, vocab_size, 20, 512, 28)

    def forward(self, images, captions):
        return self.decoder(self.encoder(images), captions)


def _perturb(module):
    """Random biases everywhere, so a wrong key mapping cannot go unnoticed."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return module.eval()


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seed")
    (tmp / "Flickr8k.token.txt").write_text("".join(f"{i}.jpg#0\t{c}\n" for i, c in enumerate(CAPTIONS)))
    torch.manual_seed(0)
    model = _perturb(SeedEncoderDecoder(vocab_size=len(seed_vocab(CAPTIONS, 1))))
    torch.save(model.state_dict(), tmp / "resnet18-small.pth")
    return model, tmp / "resnet18-small.pth", tmp / "Flickr8k.token.txt"


@pytest.fixture(scope="module")
def sgrvinod_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sgrvinod")
    word_map = upstream_code.upstream_word_map(["dog", "runs", "grass", "cat", "black"])
    (tmp / "WORDMAP_tiny.json").write_text(json.dumps(word_map))
    torch.manual_seed(0)
    encoder = upstream_code.Encoder(resnet=torchvision.models.resnet18).eval()
    decoder = _perturb(upstream_code.DecoderWithAttention(20, 24, 28, len(word_map), encoder_dim=512))
    pth = upstream_code.save_upstream_checkpoint(tmp / "BEST_checkpoint_tiny.pth.tar", encoder, decoder, epoch=7,
                                                 bleu4=0.21)
    return (encoder, decoder), word_map, pth, tmp / "WORDMAP_tiny.json"


def test_seed_vocabulary_follows_the_seeds_cleaning_and_order(seed_files):
    texts = seed_captions(seed_files[2])
    assert texts[:2] == CAPTIONS[:2]
    assert seed_vocab(texts, 1) == [*SPECIALS, "dog", "runs", "on", "the", "grass", "black", "jumps", "two", "dogs",
                                    "play", "cat", "sleeps"]  # one-letter words dropped, order of first sight
    assert seed_vocab(texts, 2) == [*SPECIALS, "dog", "on", "the", "grass"]


def test_compare_seed_model_vs_imported_checkpoint(tmp_path, seed_files):
    source, pth, captions = seed_files
    ck = load_checkpoint(import_seed(pth, captions, tmp_path / "seed.pth"))
    assert (ck.config.backbone, ck.config.enc_dim, ck.config.att_dim, ck.config.dec_dim, ck.config.emb_dim) == \
        ("resnet18", 512, 20, 28, 24)
    assert ck.config.attention == "tanh" and not ck.config.gate and ck.vocab.itos[4:6] == ["dog", "runs"]
    assert ck.config.preprocess == SEED_PREPROCESS
    images = torch.randn(2, 3, 64, 64)
    captions_ids = torch.tensor([[1, 4, 5, 6, 2], [1, 9, 10, 2, 0]])  # same ids in both vocabularies
    with torch.no_grad():
        ref_logits, ref_alphas = source(images, captions_ids)
        logprobs, alphas = ck.build_model()(images, captions_ids)
    torch.testing.assert_close(logprobs, torch.log_softmax(ref_logits, dim=2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alphas, ref_alphas, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("box", [(0, 0, 512, 600), (0, 150, 512, 451), (37, 0, 240, 600)])
def test_compare_seed_preprocessing_vs_its_notebook_transforms(box):
    # the seed's notebooks/train.ipynb: Image.open(p).convert("RGB"), then these four transforms
    photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB").crop(box)
    seed = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                      T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    np.testing.assert_array_equal(preprocess(photo, SEED_PREPROCESS), seed(photo).numpy())


def test_seed_import_infers_the_frequency_threshold_or_explains(tmp_path, seed_files):
    _, pth, captions = seed_files
    wrong = tmp_path / "other.txt"
    wrong.write_text("0.jpg#0\tcompletely different words here\n")
    with pytest.raises(CheckpointError, match="other.txt: vocabulary sizes.*never match the checkpoint's 16"):
        import_seed(pth, wrong, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="never match"):
        import_seed(pth, captions, tmp_path / "x.pth", freq_threshold=2)


def test_compare_sgrvinod_model_vs_imported_checkpoint(tmp_path, sgrvinod_files):
    (encoder, decoder), word_map, pth, wordmap = sgrvinod_files
    ck = load_checkpoint(import_sgrvinod(pth, wordmap, tmp_path / "sgr.pth", trust_pickle=True))
    assert ck.config.attention == "relu" and ck.config.gate and ck.config.backbone == "resnet18"
    assert ck.vocab.itos == [*SPECIALS, "dog", "runs", "grass", "cat", "black"]
    assert ck.train["imported_from"] == "sgrvinod" and ck.train["epoch"] == 7
    assert ck.config.preprocess == SGRVINOD_PREPROCESS
    old = torch.tensor([word_map[w] for w in ck.vocab.itos])  # new id -> sgrvinod id
    words = [["<start>", "dog", "runs", "<end>"], ["<start>", "black", "cat", "grass"]]
    new_ids = torch.tensor([[ck.vocab.stoi[w] for w in c] for c in words])
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # upstream's training forward sorts the batch by caption length
        ref_logits, _, _, ref_alphas, order = decoder(encoder(images), old[new_ids], torch.tensor([[4], [4]]))
        logprobs, alphas = ck.build_model()(images[order], new_ids[order])
    torch.testing.assert_close(logprobs, torch.log_softmax(ref_logits, dim=2)[:, :, old], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alphas, ref_alphas, atol=1e-6, rtol=1e-5)


def test_sgrvinod_checkpoint_needs_trust_pickle_and_cli_says_so_in_one_line(tmp_path, sgrvinod_files):
    _, _, pth, wordmap = sgrvinod_files
    result = CliRunner().invoke(app, ["import", str(pth), "--wordmap", str(wordmap), "--out", str(tmp_path / "o.pth")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--trust-pickle" in result.output and "BEST_checkpoint_tiny.pth.tar" in result.output
    assert not (tmp_path / "o.pth").exists()
    result = CliRunner().invoke(app, ["import", str(pth), "--wordmap", str(wordmap), "--out", str(tmp_path / "o.pth"),
                                      "--trust-pickle"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "o.pth").config.vocab_size == 9


def _import_recording_warnings(*args, **kwargs):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = CliRunner().invoke(*args, **kwargs)
    return result, [w.category.__name__ for w in seen]


def test_tutorial_era_legacy_file_imports_without_source_warnings(tmp_path, sgrvinod_files):
    (encoder, decoder), _, zip_pth, wordmap = sgrvinod_files
    legacy = upstream_code.save_upstream_checkpoint(tmp_path / "BEST_legacy.pth.tar", encoder, decoder, legacy=True)
    assert not zipfile.is_zipfile(legacy)  # torch < 1.6 format, with each class's source inside
    result, seen = _import_recording_warnings(app, ["import", str(legacy), "--wordmap", str(wordmap), "--out",
                                                    str(tmp_path / "legacy.pth"), "--trust-pickle"])
    assert result.exit_code == 0 and "SourceChangeWarning" not in seen, (seen, result.output)
    imported = load_checkpoint(tmp_path / "legacy.pth")
    reference = load_checkpoint(import_sgrvinod(zip_pth, wordmap, tmp_path / "zip.pth", trust_pickle=True))
    assert imported.config == reference.config
    assert all(torch.equal(imported.state_dict[k], v) for k, v in reference.state_dict.items())

    data = legacy.read_bytes()
    for cut in (len(data) // 1000, len(data) // 2):  # inside the pickled modules; inside the tensors
        (tmp_path / "cut.pth.tar").write_bytes(data[:cut])
        result, seen = _import_recording_warnings(app, ["import", str(tmp_path / "cut.pth.tar"), "--wordmap",
                                                        str(wordmap), "--out", str(tmp_path / "o.pth"),
                                                        "--trust-pickle"])
        assert result.exit_code == 1 and "SourceChangeWarning" not in seen, seen
        assert result.output.startswith("error:") and "cut.pth.tar: the file is truncated" in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_seed_import_via_cli_and_wrong_layout_is_refused(tmp_path, seed_files, sgrvinod_files):
    _, pth, captions = seed_files
    out = tmp_path / "s.pth"
    result = CliRunner().invoke(app, ["import", str(pth), "--captions", str(captions), "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["import", str(sgrvinod_files[2]), "--captions", str(captions),
                                      "--out", str(tmp_path / "t.pth")])
    assert result.exit_code == 1 and "refusing to load" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("arch,blocks", [("resnet34", (3, 4, 6, 3)), ("resnet50", (3, 4, 6, 3)),
                                         ("resnet101", (3, 4, 23, 3)), ("resnet152", (3, 8, 36, 3))])
def test_backbone_depth_from_number_of_blocks(arch, blocks, tmp_path):
    with torch.device("meta"):
        trunk = nn.Sequential(*list(torchvision.models.get_model(arch).children())[:-2])
    sd = {f"encoder.resnet.{k}": v for k, v in trunk.state_dict().items()}
    assert resnet_name(sd, "encoder.resnet.", tmp_path) == arch
    sd = {k: v for k, v in sd.items() if not k.startswith("encoder.resnet.6.1.")}  # one block fewer
    with pytest.raises(CheckpointError, match="not a known torchvision ResNet"):
        resnet_name(sd, "encoder.resnet.", tmp_path)
