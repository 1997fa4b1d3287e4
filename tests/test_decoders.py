import pytest
import torch

from architectures import create_decoder, list_decoders
from benchmark.train import caption_loss
from benchmark.vocab import Vocabulary

DECODERS = list_decoders()


def _inputs(B=3, T=7, V=30, N=12, D=16, P=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid, pooled = torch.randn(B, N, D, generator=g), torch.randn(B, P, generator=g)
    tokens = torch.randint(4, V, (B, T), generator=g)
    lengths = torch.tensor([T, 3, 5])[:B]
    return grid, pooled, tokens, lengths


@pytest.mark.parametrize("name", DECODERS)
def test_forward_shape_and_step_matches_teacher_forcing(name):
    torch.manual_seed(0)
    dec = create_decoder(name, vocab_size=30, grid_dim=16, pooled_dim=8).eval()
    grid, pooled, tokens, lengths = _inputs()
    out = dec(grid, pooled, tokens, lengths)
    assert out.logits.shape == (3, 7, 30)
    state = dec.init_state(grid, pooled)
    for t in range(7):
        logits, state = dec.step(tokens[:, t], state)
        valid = lengths > t
        torch.testing.assert_close(logits[valid], out.logits[valid, t], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", DECODERS)
def test_padding_does_not_leak_into_valid_positions(name):
    torch.manual_seed(0)
    dec = create_decoder(name, vocab_size=30, grid_dim=16, pooled_dim=8).eval()
    grid, pooled, tokens, lengths = _inputs()
    other = tokens.clone()
    other[1, 3:] = 0  # change only what lies beyond row 1's length (3)
    a = dec(grid, pooled, tokens, lengths).logits[1, :3]
    b = dec(grid, pooled, other, lengths).logits[1, :3]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", DECODERS)
def test_rows_are_independent_of_batch_mates(name):
    torch.manual_seed(0)
    dec = create_decoder(name, vocab_size=30, grid_dim=16, pooled_dim=8).eval()
    grid, pooled, tokens, lengths = _inputs()
    full = dec(grid, pooled, tokens, lengths).logits[2, :5]
    alone = dec(grid[2:], pooled[2:], tokens[2:, :5], lengths[2:]).logits[0, :5]
    torch.testing.assert_close(full, alone, atol=1e-5, rtol=1e-4)


def test_soft_attention_is_a_distribution_and_regularised():
    torch.manual_seed(0)
    dec = create_decoder("attn_lstm", vocab_size=30, grid_dim=16, pooled_dim=8).eval()
    grid, pooled, tokens, lengths = _inputs()
    out = dec(grid, pooled, tokens, lengths)
    assert out.attention.shape == (3, 7, 12)
    sums = out.attention.sum(-1)
    mask = torch.arange(7)[None] < lengths[:, None]
    torch.testing.assert_close(sums[mask], torch.ones(int(mask.sum())))
    assert torch.all(sums[~mask] == 0)
    targets = tokens.masked_fill(~mask, 0)
    plain = caption_loss(out, targets, 0, attention_reg=0.0)
    reg = caption_loss(out, targets, 0, attention_reg=1.0)
    coverage = out.attention.sum(1)
    torch.testing.assert_close(reg - plain, ((1 - coverage) ** 2).mean())


def test_loss_ignores_padding():
    logits = torch.randn(2, 4, 10)
    targets = torch.tensor([[5, 6, 2, 0], [7, 2, 0, 0]])
    from architectures.decoders import DecoderOutput

    loss = caption_loss(DecoderOutput(logits), targets, pad_id=0)
    mask = targets != 0
    ref = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(loss, ref)


def test_vocab_batch_builds_shifted_targets():
    v = Vocabulary.build([["a", "cat"], ["a", "dog", "runs"]])
    inputs, targets, lengths = v.batch([["a", "cat"], ["a", "dog", "runs"]], max_len=20)
    assert inputs[0].tolist() == [v.bos_id, v.stoi["a"], v.stoi["cat"], v.pad_id]
    assert targets[0].tolist() == [v.stoi["a"], v.stoi["cat"], v.eos_id, v.pad_id]
    assert lengths.tolist() == [3, 4]
