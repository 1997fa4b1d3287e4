"""A decoder must be able to memorise a handful of real images: the harness's sanity check."""

import pytest
import torch

from architectures import create_decoder, create_encoder
from benchmark.config import TrainConfig
from benchmark.data import load_karpathy
from benchmark.decoding import DecodeConfig
from benchmark.device import seed_everything
from benchmark.features import load_or_extract
from benchmark.inference import caption_features
from benchmark.metrics import ptb_tokenize, score_captions
from benchmark.train import TrainData, train_decoder
from benchmark.vocab import Vocabulary
from tests.conftest import COCO_MINI, needs


@pytest.mark.slow
@needs(COCO_MINI)
def test_attn_lstm_overfits_eight_coco_images(tmp_path):
    ds = load_karpathy(COCO_MINI)
    images = ds.split("train")[:8]
    seed_everything(0)
    enc = create_encoder("resnet18", pretrained=False)
    store = load_or_extract(enc, images, cache_dir=tmp_path)
    store.standardize(store.row_ids(images))
    captions = [im.tokens[0] for im in images]  # one caption per image to memorise
    images = [type(im)(im.image_id, im.filename, im.path, im.split, im.captions[:1], (c,))
              for im, c in zip(images, captions, strict=True)]
    vocab = Vocabulary.build(captions)
    dec = create_decoder("attn_lstm", len(vocab), enc.grid_dim, enc.pooled_dim,
                         {"embed_dim": 64, "hidden_dim": 128, "attention_dim": 64, "dropout": 0.0})
    refs = ptb_tokenize({im.image_id: list(im.captions) for im in images})
    cfg = TrainConfig(epochs=60, batch_size=8, lr=3e-3, warmup_frac=0.0, val_every=20)
    result = train_decoder(dec, TrainData(store, images, images, refs), vocab, cfg,
                           torch.device("cpu"))
    assert result.history[-1]["loss"] < 0.2 * result.history[0]["loss"]
    dec.load_state_dict(result.best_state)
    preds, _ = caption_features(dec, store, images, vocab, DecodeConfig(max_len=30), torch.device("cpu"))
    exact = sum(preds[im.image_id] == " ".join(im.tokens[0]) for im in images)
    assert exact >= 6, preds
    scores = score_captions(preds, {im.image_id: list(im.captions) for im in images},
                            metrics=("Bleu_4", "CIDEr"))
    assert scores.metrics["Bleu_4"] > 0.8
