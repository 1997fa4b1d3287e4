import itertools

import pytest
import torch

from architectures import create_decoder, list_decoders
from architectures.decoders.base import CaptionDecoder
from benchmark.decoding import SpecialTokens, beam_search, greedy_decode, sample_decode

DECODERS = list_decoders()


def _model(name, V=12, seed=0):
    torch.manual_seed(seed)
    dec = create_decoder(name, vocab_size=V, grid_dim=16, pooled_dim=8).eval()
    with torch.no_grad():  # sharpen the output layer so that decoding choices matter
        dec.fc.weight.mul_(4.0)
    return dec


def _features(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 12, 16, generator=g), torch.randn(B, 8, generator=g)


@pytest.mark.parametrize("name", DECODERS)
def test_beam_size_one_equals_greedy(name):
    dec = _model(name)
    grid, pooled = _features(6)
    assert beam_search(dec, grid, pooled, beam_size=1, max_len=8) == \
        greedy_decode(dec, grid, pooled, max_len=8)


@pytest.mark.parametrize("name", DECODERS)
def test_beam_output_does_not_depend_on_batch(name):
    dec = _model(name)
    grid, pooled = _features(7)
    together = beam_search(dec, grid, pooled, beam_size=4, max_len=8)
    alone = [beam_search(dec, grid[i : i + 1], pooled[i : i + 1], beam_size=4, max_len=8)[0]
             for i in range(7)]
    shuffled_idx = torch.tensor([3, 6, 0, 5, 1, 4, 2])
    shuffled = beam_search(dec, grid[shuffled_idx], pooled[shuffled_idx], beam_size=4, max_len=8)
    assert together == alone
    assert [together[i] for i in shuffled_idx.tolist()] == shuffled


@torch.no_grad()
def _sequence_logprob(dec, grid, pooled, words, eos=2):
    state = dec.init_state(grid, pooled)
    tok = torch.tensor([1])
    total = 0.0
    for w in [*words, eos]:
        logits, state = dec.step(tok, state)
        logp = torch.log_softmax(logits.float(), -1)
        logp[:, 0] = float("-inf")
        logp[:, 1] = float("-inf")
        total += float(logp[0, w])
        tok = torch.tensor([w])
    return total


@pytest.mark.parametrize("name", DECODERS)
def test_wide_beam_finds_the_exhaustive_optimum(name):
    V, L = 6, 3  # words 3..5 (<unk> included) and <eos>: 1 + 3 + 9 + 27 sequences
    dec = _model(name, V=V, seed=4)
    grid, pooled = _features(2, seed=5)
    with torch.no_grad():
        dec.fc.weight.mul_(0.3)  # flatter distributions: the greedy path is not the best
    for i in range(2):
        g, p = grid[i : i + 1], pooled[i : i + 1]
        candidates = [list(c) for n in range(L + 1) for c in itertools.product(range(3, V), repeat=n)]
        scores = [_sequence_logprob(dec, g, p, c) for c in candidates]
        best = candidates[max(range(len(scores)), key=scores.__getitem__)]
        found, found_score = beam_search(dec, g, p, beam_size=len(candidates), max_len=L,
                                         return_scores=True)
        assert found[0] == best
        assert found_score[0] == pytest.approx(max(scores), abs=1e-4)


def test_no_eos_in_time_closes_sequences_at_max_len():
    dec = _model("lstm")
    with torch.no_grad():
        dec.fc.bias.zero_()
        dec.fc.bias[2] = -1e4  # <eos> practically impossible
    grid, pooled = _features(3)
    for out in (greedy_decode(dec, grid, pooled, max_len=5),
                beam_search(dec, grid, pooled, beam_size=3, max_len=5)):
        assert [len(s) for s in out] == [5, 5, 5]
        assert all(0 not in s and 1 not in s for s in out)  # never <pad>/<bos>


def test_sampling_respects_top_k_and_seed():
    dec = _model("transformer")
    grid, pooled = _features(4)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = sample_decode(dec, grid, pooled, top_k=1, max_len=6, generator=g1)
    assert a == greedy_decode(dec, grid, pooled, max_len=6)  # top-1 sampling is greedy
    b = sample_decode(dec, grid, pooled, temperature=1.5, top_p=0.9, max_len=6, generator=g2)
    c = sample_decode(dec, grid, pooled, temperature=1.5, top_p=0.9, max_len=6,
                      generator=torch.Generator().manual_seed(0))
    assert b == c


class _FixedDecoder(CaptionDecoder):
    """The same next-word logits at every step and for every row."""

    def __init__(self, logits):
        super().__init__(len(logits), 4, 1)
        self.logits = torch.as_tensor(logits, dtype=torch.float32)

    def init_state(self, grid, pooled):
        return {}

    def step(self, tokens, state):
        return self.logits.expand(tokens.shape[0], -1).clone(), state


def test_sampling_draws_each_word_with_its_probability():
    """Inverse transform sampling from one uniform number per row and step: the first words
    of 40,000 rows follow softmax(logits) (over the words <pad>/<bos> are not); top-k keeps
    the k likeliest only."""
    logits = [5.0, 5.0, 0.0, 1.0, -1.0, 0.5, -30.0]  # <pad>, <bos>, <eos>, words 3..6
    dec, n = _FixedDecoder(logits), 40_000
    grid, pooled = torch.zeros(n, 1, 4), torch.zeros(n, 1)
    first = [s[0] if s else 2 for s in sample_decode(dec, grid, pooled, max_len=1,
                                                     generator=torch.Generator().manual_seed(0))]
    counts = torch.bincount(torch.tensor(first), minlength=7).double()
    p = torch.tensor(logits[2:]).softmax(0).double()
    assert counts[:2].sum() == 0 and counts[6] == 0  # never <pad>/<bos>; e^-30 is never drawn
    sigma = (n * p * (1 - p)).sqrt()
    assert ((counts[2:] - n * p).abs() < 4 * sigma + 1).all(), (counts[2:], n * p)
    top2 = sample_decode(dec, grid[:2000], pooled[:2000], max_len=1, top_k=2,
                         generator=torch.Generator().manual_seed(1))
    assert {s[0] if s else 2 for s in top2} == {3, 5}  # logits 1.0 and 0.5
    # the largest uniform below 1 picks the last word still allowed, never a filtered one
    top = torch.full((1, 50), 1 - 2**-24)
    assert sample_decode(dec, grid[:50], pooled[:50], max_len=1, top_k=2, noise=top) == [[5]] * 50


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_a_row_samples_the_same_caption_in_any_batch(name):
    """Rows decoded apart with their columns of one noise tensor (as the ranks of a distributed
    SCST step do) give the captions of the whole batch decoded together."""
    dec = _model(name)
    grid, pooled = _features(6)
    noise = torch.rand(7, 6, generator=torch.Generator().manual_seed(2))
    together = sample_decode(dec, grid, pooled, max_len=7, temperature=1.3, noise=noise)
    assert together == sample_decode(dec, grid, pooled, max_len=7, temperature=1.3,
                                     generator=torch.Generator().manual_seed(2))
    parts = {r: sample_decode(dec, grid[r::2], pooled[r::2], max_len=7, temperature=1.3,
                              noise=noise[:, r::2]) for r in (0, 1)}
    assert [parts[i % 2][i // 2] for i in range(6)] == together
    assert len(set(map(tuple, together))) > 3  # the rows did sample different captions
    with pytest.raises(ValueError, match=r"expected \(max_len, B\) = \(7, 6\)"):
        sample_decode(dec, grid, pooled, max_len=7, noise=noise[:, :5])


def test_unk_is_suppressed_on_request():
    dec = _model("rnn")
    with torch.no_grad():
        dec.fc.bias.zero_()
        dec.fc.bias[3] = 50.0  # <unk> dominates every step
    grid, pooled = _features(2)
    assert all(3 in s for s in greedy_decode(dec, grid, pooled, max_len=4))
    unk = SpecialTokens(unk=3)
    for out in (greedy_decode(dec, grid, pooled, max_len=4, special=unk),
                beam_search(dec, grid, pooled, beam_size=3, max_len=4, special=unk),
                sample_decode(dec, grid, pooled, max_len=4, special=unk)):
        assert all(3 not in s for s in out)


class _StopAtDecoder(CaptionDecoder):
    """Image i writes words 3..V-1 (word 3 the likeliest) until step ``pooled[i, 0]``, then
    ``<eos>`` on every beam. Its stopping step is static state (one row per image), its step
    count dynamic (one row per beam): beam search must keep the two aligned."""

    static_state = ("stop",)

    def __init__(self, V=8):
        super().__init__(V, 4, 1)
        self.rows_per_step: list[int] = []

    def init_state(self, grid, pooled):
        return {"stop": pooled[:, 0].long(), "t": torch.zeros(grid.shape[0], dtype=torch.long)}

    def step(self, tokens, state):
        self.rows_per_step.append(tokens.shape[0])
        K = tokens.shape[0] // state["stop"].shape[0]
        at_end = state["t"] >= state["stop"].repeat_interleave(K)
        logits = torch.full((tokens.shape[0], self.vocab_size), -10.0)
        logits[:, 3] = 0.0
        logits[at_end] = -30.0  # at the end only <eos>, on every beam, else never <eos>
        logits[:, 2] = torch.where(at_end, 10.0, -30.0)
        return logits, dict(state, t=state["t"] + 1)


def test_images_whose_beams_all_finished_leave_the_batch():
    stops = [1, 1, 2, 6, 3, 1, 8]
    pooled = torch.tensor(stops, dtype=torch.float32).unsqueeze(1)
    grid = torch.zeros(len(stops), 2, 4)
    dec = _StopAtDecoder()
    together, scores = beam_search(dec, grid, pooled, beam_size=3, max_len=10, return_scores=True)
    rows = dec.rows_per_step
    assert [len(s) for s in together] == stops
    assert all(set(s) == {3} for s in together)  # each image's best beam: word 3 throughout
    # every word costs the same small log-probability, <eos> another: score = a * stop + b
    a = (scores[6] - scores[0]) / (stops[6] - stops[0])
    assert a < 0
    assert scores == pytest.approx([scores[0] + a * (s - stops[0]) for s in stops], rel=1e-4)
    # 7 images x 3 beams; the three that end at step 1 leave (3 of 7 is over a quarter), then
    # the 2-word one (1 of 4), the 3-word one (1 of 3), the 6-word one; the last runs alone
    assert rows == [21, 21, 12, 9, 6, 6, 6, 3, 3]
    alone = [beam_search(_StopAtDecoder(), grid[i : i + 1], pooled[i : i + 1], beam_size=3,
                         max_len=10, return_scores=True) for i in range(len(stops))]
    assert together == [caption[0] for caption, _ in alone]
    assert scores == pytest.approx([score[0] for _, score in alone], abs=1e-7)


def test_beam_wider_than_the_allowed_words_still_closes_every_image():
    """With more beams than continuations, some beams stay at -inf up to ``max_len``: every
    image must still be closed with its best caption and that caption's log-probability."""
    dec = _model("lstm", V=5)  # words 3 (<unk>, suppressed) and 4 only
    grid, pooled = _features(2)
    for max_len in (1, 2):
        out, scores = beam_search(dec, grid, pooled, beam_size=4, max_len=max_len,
                                  special=SpecialTokens(unk=3), return_scores=True)
        for i in range(2):  # every caption ([], [4], [4, 4], ...) fits in the 4 beams
            g, p = grid[i : i + 1], pooled[i : i + 1]
            candidates = [[4] * n for n in range(max_len + 1)]
            logp = [_sequence_logprob(dec, g, p, c) for c in candidates]
            best = max(range(len(candidates)), key=logp.__getitem__)
            assert out[i] == candidates[best]
            assert scores[i] == pytest.approx(logp[best], abs=1e-4)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_pruned_images_keep_their_length_penalised_choice(length_penalty):
    stops = [1, 4, 2, 6]
    pooled = torch.tensor(stops, dtype=torch.float32).unsqueeze(1)
    grid = torch.zeros(len(stops), 2, 4)
    together = beam_search(_StopAtDecoder(), grid, pooled, beam_size=3, max_len=7,
                           length_penalty=length_penalty, return_scores=True)
    alone = [beam_search(_StopAtDecoder(), grid[i : i + 1], pooled[i : i + 1], beam_size=3,
                         max_len=7, length_penalty=length_penalty, return_scores=True)
             for i in range(len(stops))]
    assert together[0] == [caption[0] for caption, _ in alone]
    assert together[1] == pytest.approx([score[0] for _, score in alone], abs=1e-7)
