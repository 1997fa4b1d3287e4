"""Training beyond cross-entropy: SCST (reward, baseline, log-probs), early stopping, and
resuming a run killed with SIGKILL."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from architectures import create_decoder, list_decoders
from benchmark.decoding import SpecialTokens, sample_decode
from benchmark.train import new_self_critical_advantage, scst_loss, sequence_log_probs

REPO = Path(__file__).resolve().parents[1]


def test_new_self_critical_baseline_is_the_mean_of_the_other_samples():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5]])
    adv = new_self_critical_advantage(r)
    # sample 0 of image 0: 1 - (2 + 3 + 6) / 3
    torch.testing.assert_close(adv[0], torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0]))
    assert torch.equal(adv[1], torch.zeros(4))  # equal rewards: no signal
    with pytest.raises(ValueError):
        new_self_critical_advantage(torch.ones(3, 1))


@pytest.mark.parametrize("name", list_decoders())
def test_teacher_forced_log_probs_equal_those_of_the_sampling_policy(name):
    """The log-probabilities SCST differentiates are those the sampler drew from: replay the
    samples step by step and compare with sequence_log_probs' single forward pass."""
    torch.manual_seed(0)
    V, pad, bos, eos, max_len = 25, 0, 1, 2, 6
    dec = create_decoder(name, vocab_size=V, grid_dim=16, pooled_dim=8).eval()
    grid, pooled = torch.randn(4, 9, 16), torch.randn(4, 8)
    seqs = sample_decode(dec, grid, pooled, max_len=max_len,
                         special=SpecialTokens(bos=bos, eos=eos, pad=pad),
                         generator=torch.Generator().manual_seed(3))
    token_logp, mask = sequence_log_probs(dec, grid, pooled, seqs, bos_id=bos, eos_id=eos,
                                          pad_id=pad, max_len=max_len)
    with torch.no_grad():
        state = dec.init_state(grid, pooled)
        tokens = torch.full((4,), bos)
        for t in range(max_len):
            logits, state = dec.step(tokens, state)
            logits[:, [pad, bos]] = float("-inf")
            logp = torch.log_softmax(logits, -1)
            nxt = [s[t] if t < len(s) else eos for s in seqs]
            for b, s in enumerate(seqs):
                if t <= len(s) and t < max_len:  # a word, or the sampled <eos>
                    assert bool(mask[b, t])
                    torch.testing.assert_close(token_logp[b, t], logp[b, nxt[b]],
                                               atol=1e-5, rtol=1e-5)
            tokens = torch.tensor(nxt)
    assert int(mask.sum()) == sum(min(len(s) + 1, max_len) for s in seqs)
    loss = scst_loss(token_logp, mask, torch.tensor([1.0, -1.0, 0.5, 0.0]))
    loss.backward()  # differentiable through forward
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in dec.parameters())


def _tiny(tiny_shapes, results, **train):
    from benchmark.config import load_config

    return load_config("tiny", {"dataset": str(tiny_shapes), "results_dir": str(results),
                                **{f"train.{k}": v for k, v in train.items()}})


@pytest.mark.slow
def test_early_stopping_ends_the_phase_after_patience_validations(tiny_shapes, tmp_path):
    from benchmark.runner import run_experiment

    # lr so small that validation CIDEr-D cannot improve after the first epoch
    cfg = _tiny(tiny_shapes, tmp_path, epochs=8, patience=2, lr=1e-9)
    record, _ = run_experiment(cfg)
    hist = record.training["history"]
    stopped = record.training["stopped_early"]["xe"]
    assert stopped == hist[-1]["epoch"] < 8 and hist[-1]["stopped_early"]
    vals = [h["val_CIDEr"] for h in hist]
    best = max(vals)
    first_best = vals.index(best)
    assert len(vals) - 1 - first_best == 2  # exactly `patience` validations without a new best


@pytest.mark.slow
def test_scst_raises_the_reward_it_optimises(tiny_shapes, tmp_path):
    from benchmark.runner import run_experiment

    # from a nearly untrained model (XE at lr 1e-9), so the reward has far to climb
    cfg = _tiny(tiny_shapes, tmp_path, epochs=1, lr=1e-9, scst_epochs=6, scst_lr=3e-3,
                batch_size=8)
    record, _ = run_experiment(cfg)
    rewards = [h["reward"] for h in record.training["history"] if h["phase"] == "scst"]
    assert record.training["objective"] == "xe+scst" and len(rewards) == 6
    # mean sampled CIDEr-D per epoch (140 samples each): measured 0.25 -> 0.38 on this CPU
    assert sum(rewards[-2:]) > 1.2 * sum(rewards[:2]), rewards
    assert record.training["scst_captions_per_s"] > 0
    from benchmark.report import leaderboard, render_markdown

    md = render_markdown(leaderboard([record], baselines=False))
    assert "| obj |" in md and "| xe+scst |" in md  # the board says how it was trained


_KILLER = textwrap.dedent("""
    import json, os, signal, sys
    import benchmark.train as train
    from benchmark.config import load_config
    from benchmark.runner import run_experiment

    dataset, results, kill_at, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    calls = {"n": 0}
    for name in ("caption_loss", "scst_loss"):  # count optimisation steps of either phase
        real = getattr(train, name)
        def wrapped(*a, _real=real, **k):
            calls["n"] += 1
            if calls["n"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # mid-epoch, no cleanup of any kind
            return _real(*a, **k)
        setattr(train, name, wrapped)
    cfg = load_config("tiny", {"dataset": dataset, "results_dir": results, "train.epochs": 2,
                               "train.scst_epochs": 2, "train.batch_size": 16})
    record, _ = run_experiment(cfg, resume=resume)
    print(json.dumps({"run_id": record.run_id, "metrics": record.metrics,
                      "resumed_from": record.training["resumed_from"],
                      "predictions": record.predictions}))
""")


def _child(tiny_shapes, results, kill_at: int, resume: bool):
    return subprocess.run([sys.executable, "-c", _KILLER, str(tiny_shapes), str(results),
                           str(kill_at), "1" if resume else "0"], cwd=REPO, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.long
def test_a_run_killed_mid_epoch_resumes_to_exactly_the_uninterrupted_result(tiny_shapes, tmp_path):
    # 28 train images x 5 captions / 16 = 9 XE steps per epoch; 28 / 16 = 2 SCST steps
    clean = _child(tiny_shapes, tmp_path / "clean", 0, False)
    assert clean.returncode == 0, clean.stderr[-3000:]
    want = json.loads(clean.stdout.strip().splitlines()[-1])
    results = tmp_path / "killed"
    first = _child(tiny_shapes, results, 9 + 4, False)  # in XE epoch 2
    assert first.returncode == -9, first.stderr[-3000:]
    states = list((results / "unfinished").rglob("*.pt"))
    assert len(states) == 1
    # resumed after epoch 1: XE epoch 2 (9 steps), SCST epoch 3 (2), then killed in epoch 4
    second = _child(tiny_shapes, results, 9 + 2 + 1, True)
    assert second.returncode == -9, second.stderr[-3000:]
    third = _child(tiny_shapes, results, 0, True)
    assert third.returncode == 0, third.stderr[-3000:]
    got = json.loads(third.stdout.strip().splitlines()[-1])
    assert got["run_id"] == states[0].stem  # the same run, continued
    assert got["resumed_from"] == 3  # after 2 XE epochs and 1 SCST epoch
    assert got["predictions"] == want["predictions"]
    assert got["metrics"] == want["metrics"]
    assert not list((results / "unfinished").rglob("*.pt"))  # finished: nothing left to resume


@pytest.mark.slow
def test_compiled_training_equals_eager_training(tiny_shapes, tmp_path):
    """``train.compile`` (torch.compile over full-length teacher-forcing batches) trains the
    same model: per-epoch losses within 1e-5 and the same test captions."""
    from benchmark.runner import run_experiment

    records = []
    for compiled in (False, True):
        cfg = _tiny(tiny_shapes, tmp_path / str(compiled), epochs=2, compile=compiled)
        cfg.decoder, cfg.decoder_hparams["dropout"] = "transformer", 0.0
        records.append(run_experiment(cfg)[0])
    eager, fast = ([h["loss"] for h in r.training["history"]] for r in records)
    assert max(abs(a - b) for a, b in zip(eager, fast, strict=True)) < 1e-5
    assert records[1].predictions == records[0].predictions
    assert records[1].config["train"]["compile"] and not records[0].config["train"]["compile"]
