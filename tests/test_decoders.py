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


@pytest.mark.parametrize("beams", [1, 3])
def test_blocked_additive_scores_match_the_plain_expression(monkeypatch, beams):
    """Show-Attend-Tell's scores ``relu(W_a a + W_h h) @ w`` computed in cache-sized blocks of
    images (with gradients recomputed per block) equal autograd's plain expression, also when
    the blocks split the batch unevenly and when K beams share one image's grid."""
    from architectures.decoders import attn_lstm

    g = torch.Generator().manual_seed(0)
    grid_proj = torch.randn(5, 7, 6, dtype=torch.double, generator=g, requires_grad=True)
    hidden = torch.randn(5 * beams, 6, dtype=torch.double, generator=g, requires_grad=True)
    weight = torch.randn(6, dtype=torch.double, generator=g, requires_grad=True)
    for block in (1 << 20, 2 * beams * 7 * 6):  # one block; blocks of 2 images (2 + 2 + 1)
        monkeypatch.setattr(attn_lstm, "CPU_BLOCK_ELEMENTS", block)
        assert len(attn_lstm._row_blocks(5, beams * 7 * 6, grid_proj.device)) == (
            1 if block == 1 << 20 else 3)
        blocked = attn_lstm.AdditiveScores.apply(grid_proj, hidden, weight)
        plain = torch.relu(grid_proj.repeat_interleave(beams, 0) + hidden.unsqueeze(1)) @ weight
        torch.testing.assert_close(blocked, plain, rtol=1e-12, atol=1e-12)
        upstream = torch.randn(plain.shape, dtype=torch.double, generator=g)
        got = torch.autograd.grad(blocked, (grid_proj, hidden, weight), upstream)
        want = torch.autograd.grad(plain, (grid_proj, hidden, weight), upstream)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["attn_lstm", "transformer"])
def test_beams_sharing_their_images_static_state_step_as_expanded_copies(name):
    """Beam search keeps a decoder's ``static_state`` at one row per image; each step must give
    the logits it gives when those rows are copied once per beam (the K beams differ)."""
    torch.manual_seed(0)
    dec = create_decoder(name, vocab_size=30, grid_dim=16, pooled_dim=8).eval()
    assert dec.static_state
    grid, pooled, tokens, _ = _inputs()
    K = 4
    beam_rows = torch.arange(3).repeat_interleave(K)
    with torch.no_grad():
        state = dec.init_state(grid, pooled)
        shared = dec.select_state(state, beam_rows, within_image=True)
        copied = dec.select_state(state, beam_rows)
        assert shared[dec.static_state[0]].shape[0] == 3
        assert copied[dec.static_state[0]].shape[0] == 3 * K
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            words = torch.randint(4, 30, (3 * K,), generator=g)
            a, shared = dec.step(words, shared)
            b, copied = dec.step(words, copied)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
            assert not torch.allclose(a[0], a[1])  # the beams of one image really differ


def test_transformer_attention_dropout_stops_with_its_dropout_modules():
    """SCST samples in training mode with every Dropout module in eval
    (``benchmark.train._without_dropout``): the attention dropout must stop too, or the policy
    that samples is not the one that is differentiated."""
    from benchmark.train import _without_dropout

    torch.manual_seed(0)
    dec = create_decoder("transformer", vocab_size=30, grid_dim=16, pooled_dim=8, dropout=0.5)
    grid, pooled, tokens, lengths = _inputs()
    dec.train()
    a, b = dec(grid, pooled, tokens, lengths).logits, dec(grid, pooled, tokens, lengths).logits
    assert not torch.allclose(a, b)  # dropout is on in training
    with _without_dropout(dec):
        a, b = dec(grid, pooled, tokens, lengths).logits, dec(grid, pooled, tokens, lengths).logits
    torch.testing.assert_close(a, b)


def test_attn_lstm_gives_the_same_training_gradients_and_beams_on_both_score_paths(monkeypatch):
    """attn_lstm scores small batches with the plain expression and large ones in blocks
    (``CPU_BLOCK_ELEMENTS``); forcing blocks must change neither the loss, nor its gradients,
    nor the beams."""
    from architectures.decoders import attn_lstm
    from benchmark.decoding import beam_search

    grid, pooled, tokens, lengths = _inputs()
    results = []
    for block in (1 << 20, 64):  # plain expression; several blocks (64 < 12 x 256 per image)
        monkeypatch.setattr(attn_lstm, "CPU_BLOCK_ELEMENTS", block)
        torch.manual_seed(0)
        dec = create_decoder("attn_lstm", vocab_size=30, grid_dim=16, pooled_dim=8, dropout=0.0)
        out = dec(grid, pooled, tokens, lengths)
        loss = caption_loss(out, tokens, 0, dec.attention_regularization)
        loss.backward()
        grads = [p.grad.clone() for p in dec.parameters()]
        beams = beam_search(dec.eval(), grid, pooled, beam_size=3, max_len=6, return_scores=True)
        results.append((loss.detach(), grads, beams))
    (loss_a, grads_a, beams_a), (loss_b, grads_b, beams_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert beams_a[0] == beams_b[0]
    assert beams_a[1] == pytest.approx(beams_b[1], abs=1e-5)
