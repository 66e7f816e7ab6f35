"""Importers: small checkpoints in the seed's and sgrvinod's layouts, written by stand-in modules
with their module/parameter names, convert into models whose outputs equal the source model's."""
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from typer.testing import CliRunner

from sat_export.cli.export import app
from sat_export.importers import import_seed, import_sgrvinod, resnet_name, seed_captions, seed_vocab
from training.checkpoint import load_checkpoint
from training.errors import CheckpointError
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


# --- sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning models.py, same names; pickled as `models.*` -------------
class Encoder(nn.Module):
    def __init__(self, encoded_image_size=14):
        super().__init__()
        self.enc_image_size = encoded_image_size
        self.resnet = _resnet18_trunk()
        self.adaptive_pool = nn.AdaptiveAvgPool2d((encoded_image_size, encoded_image_size))

    def forward(self, images):
        return self.adaptive_pool(self.resnet(images)).permute(0, 2, 3, 1)


class Attention(nn.Module):
    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)
        self.relu = nn.ReLU()
        self.softmax = nn.Softmax(dim=1)

    def forward(self, encoder_out, decoder_hidden):
        att1, att2 = self.encoder_att(encoder_out), self.decoder_att(decoder_hidden)
        alpha = self.softmax(self.full_att(self.relu(att1 + att2.unsqueeze(1))).squeeze(2))
        return (encoder_out * alpha.unsqueeze(2)).sum(dim=1), alpha


class DecoderWithAttention(nn.Module):
    def __init__(self, attention_dim, embed_dim, decoder_dim, vocab_size, encoder_dim=512, dropout=0.5):
        super().__init__()
        self.attention = Attention(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.decode_step = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim, bias=True)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)
        self.sigmoid = nn.Sigmoid()
        self.fc = nn.Linear(decoder_dim, vocab_size)

    def forward(self, encoder_out, captions):
        encoder_out = encoder_out.reshape(encoder_out.size(0), -1, encoder_out.size(-1))
        embeddings = self.embedding(captions)
        mean = encoder_out.mean(dim=1)
        h, c = self.init_h(mean), self.init_c(mean)
        preds, alphas = [], []
        for t in range(captions.size(1) - 1):
            awe, alpha = self.attention(encoder_out, h)
            awe = self.sigmoid(self.f_beta(h)) * awe
            h, c = self.decode_step(torch.cat([embeddings[:, t], awe], dim=1), (h, c))
            preds.append(self.fc(self.dropout(h)))
            alphas.append(alpha)
        return torch.stack(preds, 1), torch.stack(alphas, 1)


for _cls in (Encoder, Attention, DecoderWithAttention):
    _cls.__module__ = "models"  # as pickled by sgrvinod's train.py


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
    words = ["dog", "runs", "grass", "cat", "black"]
    word_map = {w: i + 1 for i, w in enumerate(words)}
    word_map.update({"<unk>": len(words) + 1, "<start>": len(words) + 2, "<end>": len(words) + 3, "<pad>": 0})
    (tmp / "WORDMAP_tiny.json").write_text(json.dumps(word_map))
    torch.manual_seed(0)
    encoder, decoder = Encoder(), _perturb(DecoderWithAttention(20, 24, 28, len(word_map)))
    models = types.ModuleType("models")  # importable while saving only, as in sgrvinod's repository
    models.Encoder, models.Attention, models.DecoderWithAttention = Encoder, Attention, DecoderWithAttention
    sys.modules["models"] = models
    try:
        torch.save({"epoch": 7, "bleu-4": 0.21, "encoder": encoder.eval(), "decoder": decoder,
                    "encoder_optimizer": None, "decoder_optimizer": torch.optim.Adam(decoder.parameters())},
                   tmp / "BEST_checkpoint_tiny.pth.tar")
    finally:
        del sys.modules["models"]
    return (encoder, decoder), word_map, tmp / "BEST_checkpoint_tiny.pth.tar", tmp / "WORDMAP_tiny.json"


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
    images = torch.randn(2, 3, 64, 64)
    captions_ids = torch.tensor([[1, 4, 5, 6, 2], [1, 9, 10, 2, 0]])  # same ids in both vocabularies
    with torch.no_grad():
        ref_logits, ref_alphas = source(images, captions_ids)
        logprobs, alphas = ck.build_model()(images, captions_ids)
    torch.testing.assert_close(logprobs, torch.log_softmax(ref_logits, dim=2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alphas, ref_alphas, atol=1e-6, rtol=1e-5)


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
    old = torch.tensor([word_map[w] for w in ck.vocab.itos])  # new id -> sgrvinod id
    words = [["<start>", "dog", "runs", "<end>"], ["<start>", "black", "cat", "grass"]]
    new_ids = torch.tensor([[ck.vocab.stoi[w] for w in c] for c in words])
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref_logits, ref_alphas = decoder(encoder(images), old[new_ids])
        logprobs, alphas = ck.build_model()(images, new_ids)
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
