"""Throughput protocol: warm-up, device synchronisation, median and spread of repeated timings.

Used by ``capbench bench`` on synthetic inputs, so any workload can be timed without data:
a decoder on random features of a given grid (e.g. the Show-Attend-Tell paper's 196 x 2048
grid, 512-d attention/embedding/LSTM, 10k words, batch 32, 20 words) or an encoder on random
pixels. Figures (units in the keys):

* ``train_samples_per_s`` / ``train_tokens_per_s``: one teacher-forced step (forward, masked
  cross-entropy, backward, AdamW update) per iteration;
* ``beam1_captions_per_s`` / ``beamK_captions_per_s``: batched decoding of ``caption_len``
  words (``<eos>`` suppressed so every run decodes the full length and timings compare);
* ``latency_ms_p50`` / ``latency_ms_p95``: greedy captioning of one image (batch 1);
* ``encoder_images_per_s``, ``encoder_gflops_per_image`` (torch's FlopCounterMode, 1 multiply-
  add = 2 FLOPs) and ``encoder_latency_ms_p50``;
* ``peak_memory_mb``: CUDA max allocated, or the process peak RSS on CPU; ``params``;
* ``train_gflop`` / ``beam1_gflop`` / ``beamK_gflop``: FLOPs of one training step (forward
  and backward) and of one decoded batch, counted by torch's FlopCounterMode (matrix
  products, convolutions and attention; 1 multiply-add = 2 FLOPs; element-wise work is not
  counted), and ``*_gflops``: those FLOPs divided by the median time (achieved GFLOP/s).
  FlopCounterMode does not count the fused ``nn.LSTM``/``nn.RNN`` kernels that ``rnn`` and
  ``lstm`` use (``flops_exclude_fused_rnn``): their FLOPs and utilisation are lower bounds;
* with a measured peak (:func:`matmul_peak`, ``capbench bench decoders --peak``): ``peak_fp32_gflops``,
  ``peak_bf16_gflops`` and ``*_util`` = achieved / peak of the dtype the phase ran in.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import pandas as pd
import torch

from architectures import create_decoder, create_encoder, list_decoders, list_encoders
from benchmark.cider import CiderD
from benchmark.config import TrainConfig
from benchmark.data import resolve_dataset
from benchmark.decoding import beam_search, greedy_decode
from benchmark.device import peak_memory_mb, select_device, synchronize
from benchmark.errors import ConfigError, DatasetError
from benchmark.features import (
    default_num_workers,
    extract_features,
    extraction_mode,
    open_store,
    shard_images,
    write_manifest,
    write_shard,
)
from benchmark.fsutil import ensure_writable
from benchmark.limits import check_memory
from benchmark.metrics import ptb_tokenize
from benchmark.pixels import pixel_batches
from benchmark.train import CaptionTable, StepContext, xe_optimizer, xe_step
from benchmark.vocab import Vocabulary

__all__ = ["DecoderWorkload", "time_fn", "bench_decoder", "bench_encoder", "run_bench",
           "table_columns", "count_flops", "matmul_peak", "matmul_rate", "add_utilisation", "bf16_supported",
           "bench_store", "StoreWorkload", "bench_extraction", "pixel_difference", "bench_models",
           "check_workload",
           "rows_frame", "table_cells", "parse_gemm", "bench_gemm", "gemm_summary",
           "check_store_size", "store_summary", "check_extraction", "extraction_names",
           "extraction_summary", "reward_summary"]


@dataclass
class DecoderWorkload:
    """Every dimension of a decoder benchmark (defaults: Show-Attend-Tell, Xu et al. 2015)."""

    grid_size: int = 196
    grid_dim: int = 2048
    pooled_dim: int = 2048
    vocab_size: int = 10000
    batch_size: int = 32
    caption_len: int = 20
    embed_dim: int = 512
    hidden_dim: int = 512
    attention_dim: int = 512
    num_layers: int = 1
    num_heads: int = 8
    beam_size: int = 5

    def memory_bytes(self) -> int:
        """A rough lower bound on the bytes one training step and beam search of this workload
        hold: float32 features of the batch (and its beams), the logits with their gradient
        and log-softmax, and the embedding and output layers with AdamW's two moments."""
        features = self.batch_size * max(self.beam_size, 1) * self.grid_size * self.grid_dim
        logits = 3 * self.batch_size * self.caption_len * self.vocab_size
        params = 4 * self.vocab_size * (self.embed_dim + self.hidden_dim)
        return 4 * (features + logits + params)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 2,
            iters: int = 5) -> dict[str, float]:
    """Seconds per call of ``fn``: median, p05/p95 and IQR over ``iters`` synchronised runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    q = statistics.quantiles(times, n=20) if len(times) > 1 else [times[0]] * 19
    quart = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median": statistics.median(times), "p05": q[0], "p95": q[-1],
            "iqr": quart[2] - quart[0], "n": len(times)}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as torch's FlopCounterMode counts them (matrix products,
    convolutions, attention; 1 multiply-add = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware (CUDA; on CPU: AVX-512 BF16 or
    AMX, which oneDNN uses). Without it, CPU bf16 matmuls fall back to a slow generic kernel
    (measured here: 0.1-0.3 GFLOP/s on an AVX2-only CPU), so no bf16 peak is reported."""
    if device.type == "cuda":  # bf16 tensor cores from Ampere (compute capability 8) on
        return torch.cuda.get_device_properties(device).major >= 8
    cpu = getattr(torch, "cpu", None)
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def matmul_rate(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype = torch.float32,
                *, iters: int = 3) -> float:
    """GFLOP/s of ``(m, k) @ (k, n)`` in ``dtype``: the best of ``iters`` timed products
    (``2 m k n`` FLOPs each) after one warm-up; on CPU with torch's current thread count.
    A decoder's step loop multiplies matrices of only batch-size rows (``capbench bench
    gemm 32x2048x2048``), far from the peak of large ones."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


def matmul_peak(device: torch.device, dtype: torch.dtype, *, n: int | None = None,
                iters: int | None = None) -> float:
    """The device's own matrix-multiply peak in GFLOP/s: :func:`matmul_rate` of a large
    square ``(n, n) @ (n, n)`` product (n = 4096, best of 3, on the CPU; 8192, best of 10, on
    CUDA, where a 4096 product lasts about 0.2 ms on an H100 and would time the launch).
    Check :func:`bf16_supported` before asking for bf16."""
    cuda = device.type == "cuda"
    size = n or (8192 if cuda else 4096)
    return matmul_rate(size, size, size, device, dtype, iters=iters or (10 if cuda else 3))


def add_utilisation(row: dict, peaks: dict[str, float]) -> dict:
    """``row`` with ``peak_*_gflops`` and ``*_util`` (achieved GFLOP/s / the peak of the dtype
    the phase ran in: bf16 under autocast, else fp32) for every ``*_gflops`` figure."""
    out = {**row, **{f"peak_{k}_gflops": v for k, v in peaks.items()}}
    peak = peaks.get("bf16" if row.get("amp_bf16") else "fp32")
    for key in [k for k in row if k.endswith("_gflops") and not k.startswith("peak_")]:
        out[key.replace("_gflops", "_util")] = row[key] / peak if peak else None
    return out


def _decoder_hparams(w: DecoderWorkload) -> dict:
    """The workload's dimensions as hyperparameters; each decoder takes those it declares."""
    return {"embed_dim": w.embed_dim, "hidden_dim": w.hidden_dim,
            "attention_dim": w.attention_dim, "num_layers": w.num_layers,
            "num_heads": w.num_heads, "dropout": 0.0, "max_len": max(64, w.caption_len + 2)}


def _trainer_step(dec, device: torch.device, amp: bool) -> StepContext:
    """The step context of the trainer's own cross-entropy step (:func:`xe_step`) for
    ``dec``: its AdamW groups and warmup-cosine schedule, gradient clipping and label
    smoothing as a default :class:`TrainConfig` sets them, bf16 autocast when ``amp``, and
    padding id 0 (that of the synthetic targets)."""
    cfg = TrainConfig()
    # a short run's schedule: the learning rate does not change the time of a step
    opt, sched = xe_optimizer(dec, cfg, 1000, device)
    return StepContext(dec, dec, opt, sched, cfg, device, Vocabulary([]), autocast=amp)


def bench_decoder(arch: str, w: DecoderWorkload, device: torch.device, *, iters: int = 5,
                  warmup: int = 2, amp: bool | None = None, compile: bool = False) -> dict:
    """Time training steps, beam-1/beam-K decoding and batch-1 latency of decoder ``arch``.

    ``compile``: also time the training step through ``torch.compile(dynamic=True)`` (as
    ``capbench run --compile`` trains), alternating eager and compiled rounds, and report
    ``train_compiled_samples_per_s`` and ``compile_speedup`` (eager median / compiled median).
    """
    torch.manual_seed(0)
    use_amp = device.type == "cuda" if amp is None else amp
    dec = create_decoder(arch, w.vocab_size, w.grid_dim, w.pooled_dim, _decoder_hparams(w),
                         strict=False).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    B, T = w.batch_size, w.caption_len + 1
    grid = torch.randn(B, w.grid_size, w.grid_dim, generator=g).to(device)
    pooled = torch.randn(B, w.pooled_dim, generator=g).to(device)
    tokens = torch.randint(4, w.vocab_size, (B, T), generator=g).to(device)
    tokens[:, 0] = 1
    targets = torch.randint(4, w.vocab_size, (B, T), generator=g).to(device)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[0] = T
    pad = torch.arange(T)[None] >= lengths[:, None]
    targets[pad.to(device)] = 0
    batch = CaptionTable(tokens, targets, lengths)  # lengths stay on the CPU, as in training
    eager = _trainer_step(dec, device, use_amp)

    def train_step(ctx=eager):
        dec.train()
        xe_step(ctx, grid, pooled, batch)

    train_flop = count_flops(train_step)
    t_train = time_fn(train_step, device, warmup=warmup, iters=iters)
    compiled = {}
    if compile:
        fast = replace(eager, model=torch.compile(dec, dynamic=True))
        eager_t, fast_t = [], []
        time_fn(lambda: train_step(fast), device, warmup=2, iters=1)  # compiles
        for _ in range(3):  # alternating rounds: the machine's load hits both alike
            eager_t.append(time_fn(train_step, device, warmup=1, iters=iters)["median"])
            fast_t.append(time_fn(lambda: train_step(fast), device, warmup=1, iters=iters)["median"])
        compiled = {"train_compiled_samples_per_s": B / statistics.median(fast_t),
                    "compile_speedup": statistics.median(eager_t) / statistics.median(fast_t)}
    dec.eval()
    with torch.no_grad():
        dec.fc.bias[2] = -1e9  # suppress <eos>: decode the full caption_len every time
    n_tok = int(lengths.sum())
    ctx = dict(max_len=w.caption_len)

    def run_decode(beam):
        with torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
            if beam == 1:
                return greedy_decode(dec, grid, pooled, **ctx)
            return beam_search(dec, grid, pooled, beam_size=beam, **ctx)

    b1_flop, bk_flop = count_flops(lambda: run_decode(1)), count_flops(lambda: run_decode(w.beam_size))
    t_b1 = time_fn(lambda: run_decode(1), device, warmup=1, iters=iters)
    t_bk = time_fn(lambda: run_decode(w.beam_size), device, warmup=1, iters=iters)
    K = w.beam_size
    lat = time_fn(lambda: greedy_decode(dec, grid[:1], pooled[:1], **ctx), device,
                  warmup=2, iters=max(iters * 4, 20))
    return {
        "arch": arch, "device": str(device), "amp_bf16": use_amp, **asdict(w),
        "params": sum(p.numel() for p in dec.parameters()),
        "train_samples_per_s": B / t_train["median"],
        "train_tokens_per_s": n_tok / t_train["median"],
        "train_step_ms_iqr": 1000 * t_train["iqr"], **compiled,
        "beam1_captions_per_s": B / t_b1["median"],
        f"beam{w.beam_size}_captions_per_s": B / t_bk["median"],
        "latency_ms_p50": 1000 * lat["median"], "latency_ms_p95": 1000 * lat["p95"],
        "peak_memory_mb": peak_memory_mb(device), "iters": iters,
        "train_gflop": train_flop / 1e9, "beam1_gflop": b1_flop / 1e9, f"beam{K}_gflop": bk_flop / 1e9,
        "train_gflops": train_flop / 1e9 / t_train["median"],
        "beam1_gflops": b1_flop / 1e9 / t_b1["median"],
        f"beam{K}_gflops": bk_flop / 1e9 / t_bk["median"],
        # FlopCounterMode has no formula for the fused cuDNN/MKL RNN kernels
        "flops_exclude_fused_rnn": any(isinstance(m, torch.nn.RNNBase) for m in dec.modules()),
    }


def bench_encoder(name: str, device: torch.device, *, batch_size: int = 16, iters: int = 3,
                  warmup: int = 1) -> dict:
    """Forward images/s on random pixels, GFLOPs per image and batch-1 latency of an encoder
    (random weights), run as extraction runs it (:func:`benchmark.features.extraction_mode`:
    on CUDA bf16 autocast, channels-last and ``cudnn.benchmark``)."""
    from torch.utils.flop_counter import FlopCounterMode


    enc = create_encoder(name, pretrained=False).to(device).eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    shape = enc.input_size()
    x = torch.randn(batch_size, *shape, device=device)
    with FlopCounterMode(display=False) as counter:
        enc(x[:1])
    with extraction_mode(enc, device) as (run, memory_format):
        x = x.contiguous(memory_format=memory_format)
        t = time_fn(lambda: run(x), device, warmup=warmup, iters=iters)
        lat = time_fn(lambda: run(x[:1]), device, warmup=warmup, iters=max(iters * 3, 10))
    return {"encoder": enc.name, "device": str(device), "batch_size": batch_size,
            "input": "x".join(map(str, shape)), "grid": f"{enc.grid_size}x{enc.grid_dim}",
            "params": sum(p.numel() for p in enc.parameters()),
            "encoder_gflops_per_image": counter.get_total_flops() / 1e9,
            "encoder_images_per_s": batch_size / t["median"],
            "encoder_latency_ms_p50": 1000 * lat["median"],
            "peak_memory_mb": peak_memory_mb(device), "iters": iters}


def run_bench(archs: list[str], encoders: list[str], workload: DecoderWorkload,
              device: torch.device, *, iters: int = 5, log=None, peak: bool = False,
              compile: bool = False, encoder_batch_size: int | None = None) -> list[dict]:
    """Rows of :func:`bench_decoder` for each decoder and :func:`bench_encoder` for each encoder.

    Args:
        archs: decoder names (registry names or aliases), timed in this order.
        encoders: encoder names, timed after the decoders.
        workload: the decoders' synthetic sizes (:class:`DecoderWorkload`: grid ``(B, N, D)``,
            vocabulary, caption length, model dims).
        device: the device everything runs on.
        iters: timed iterations per figure (median reported); each encoder runs
            ``max(2, iters // 2)``.
        log: ``log(text)`` is told the progress (None: silent).
        peak: measure the device's matmul peak first (fp32, and bf16 where the device has bf16
            matrix hardware) and add every decoder row's utilisation, achieved GFLOP/s / peak
            (:func:`add_utilisation`).
        compile: also time each decoder's training step through ``torch.compile`` (see
            :func:`bench_decoder`).
        encoder_batch_size: images per encoder batch (default ``min(workload.batch_size, 16)``).

    Returns:
        One dict per decoder, then per encoder: throughputs (samples/s, captions/s, images/s),
        latencies (seconds), GFLOPs and, for decoders, peak memory (MB).

    Raises:
        ArchitectureError: an unknown decoder or encoder name.
    """
    log = log or (lambda text: None)
    rows = []
    peaks = {}
    if peak:
        log("measuring the matmul peak (fp32, bf16) ...")
        peaks = {"fp32": matmul_peak(device, torch.float32)}
        if bf16_supported(device):
            peaks["bf16"] = matmul_peak(device, torch.bfloat16)
        else:
            log("no bf16 matrix hardware on this device: bf16 peak not measured")
    for a in archs:
        log(f"timing decoder {a} ...")
        row = bench_decoder(a, workload, device, iters=iters, compile=compile)
        rows.append(add_utilisation(row, peaks) if peaks else row)
    for e in encoders:
        log(f"timing encoder {e} ...")
        rows.append(bench_encoder(e, device, batch_size=encoder_batch_size
                                  or min(workload.batch_size, 16),
                                  iters=max(2, iters // 2)))
    return rows


def table_columns(columns) -> list[str]:
    """The columns of a bench DataFrame that the terminal table shows."""
    return [c for c in columns if c in ("arch", "encoder", "params", "input", "grid")
            or c.endswith("per_s") or c.startswith("latency") or "gflop" in c
            or c.endswith("_util") or c in ("peak_memory_mb", "compile_speedup")]


def bench_reward(dataset_spec: str, *, batches: int = 20, images: int = 32, samples: int = 5,
                 rounds: int = 3, seed: int = 0) -> dict:
    """Throughput of the SCST reward: CIDEr-D of ``batches`` x ``images`` x ``samples``
    candidate captions (train references of other images, a fixed-seed draw) against their
    images' train references, scored by :class:`benchmark.cider.CiderD` (document frequencies
    of the whole train split, computed once) and by pycocoevalcap's ``Cider`` (which recounts
    the batch's references and document frequencies on every call), in ``rounds`` alternating
    rounds. Returns captions/s (median over rounds) of each, and CiderD's one-off build time.
    Raises DatasetError for a bad dataset or a train split with fewer than ``images`` images.
    """
    import random

    from pycocoevalcap.cider.cider import Cider


    train = resolve_dataset(dataset_spec).split("train")
    if len(train) < images:
        raise DatasetError(f"{dataset_spec}: the train split has {len(train)} images; the reward "
                           f"benchmark draws {images} per batch")
    refs = ptb_tokenize({im.image_id: list(im.captions) for im in train})
    ids, pool = list(refs), [c for v in refs.values() for c in v]
    rng = random.Random(seed)
    work = []
    for _ in range(batches):
        chosen = rng.sample(ids, images)
        work.append(([i for i in chosen for _ in range(samples)],
                     [rng.choice(pool) for _ in range(images * samples)]))
    t0 = time.perf_counter()
    scorer = CiderD(refs)
    build = time.perf_counter() - t0
    n = batches * images * samples
    rates: dict[str, list[float]] = {"capbench_CiderD": [], "pycocoevalcap_Cider": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        for img_ids, caps in work:
            scorer.score_pairs(caps, img_ids)
        rates["capbench_CiderD"].append(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for img_ids, caps in work:
            keys = [f"{i}#{k}" for k, i in enumerate(img_ids)]
            Cider().compute_score({k: refs[i] for k, i in zip(keys, img_ids, strict=True)},
                                  {k: [c] for k, c in zip(keys, caps, strict=True)})
        rates["pycocoevalcap_Cider"].append(n / (time.perf_counter() - t0))
    out = {k: float(statistics.median(v)) for k, v in rates.items()}
    return {"captions": n, "train_images": len(train), "references": len(pool),
            "ciderd_build_s": build, **{f"{k}_captions_per_s": v for k, v in out.items()}}


def bench_extraction(dataset_spec: str, encoders: list[str], device: torch.device, *,
                     images: int = 256, batch_size: int = 256, rounds: int = 3,
                     num_workers: int | None = None, log=None) -> list[dict]:
    """Feature extraction of the first ``images`` images of a dataset with each image decoder.

    The image decoders (``features.image_decoder``): ``pil`` (Pillow and the library's transform
    in the DataLoader's ``num_workers`` workers) and ``torchvision`` (TorchCodec's ``decode_jpeg``
    and tensor transforms on ``device``; nvJPEG on CUDA). Two figures each: images/s of the
    pixels alone (read, decode, preprocess, on ``device``: what the encoder is fed) and end to
    end (with the encoder's forward, bf16 autocast on CUDA). Extraction is limited by the CPU
    when the ``pil`` pixel rate is below the end-to-end rate the GPU could reach. One untimed
    batch of each warms up (cuDNN autotuning, nvJPEG's handle), then ``rounds`` alternating
    rounds.

    Args:
        dataset_spec: ``shapes``, ``shapes:N`` or a Karpathy dataset.json.
        encoders: encoder names (random weights: speed does not depend on them).
        device: where the pixels are preprocessed (``torchvision``) and the encoder runs.
        images: the dataset's first N images.
        batch_size: images per batch.
        rounds: alternating timed rounds (median reported).
        num_workers: DataLoader worker processes (None: :func:`~benchmark.features.default_num_workers`).
        log: ``log(text)`` is told the progress (None: silent).

    Returns:
        One row per encoder with the median images/s of each decoder (pixels alone and end to
        end), the end-to-end speedup of ``torchvision`` over ``pil`` and how far the two
        decoders' pixels are apart (:func:`pixel_difference`).

    Raises:
        DatasetError: a bad dataset.
        ConfigError: an encoder whose transform has no tensor version.
    """
    pics = resolve_dataset(dataset_spec).images[:images]
    workers = default_num_workers() if num_workers is None else num_workers
    batches = [list(range(a, min(a + batch_size, len(pics)))) for a in range(0, len(pics), batch_size)]
    rows = []
    for name in encoders:
        enc = create_encoder(name, pretrained=False)
        decoders = ("pil", "torchvision")
        rates: dict[str, list[float]] = {f"{d}_{k}": [] for d in decoders for k in ("pixels", "e2e")}

        def pixels(decoder: str, enc=enc) -> float:
            t0 = time.perf_counter()
            for _ in pixel_batches(enc.transform, pics, batches, device, num_workers=workers,
                                   image_decoder=decoder):
                pass
            synchronize(device)
            return len(pics) / (time.perf_counter() - t0)

        def e2e(decoder: str, subset: list, enc=enc) -> float:
            return extract_features(enc, subset, batch_size=batch_size, device=device,
                                    num_workers=workers, image_decoder=decoder)[2]

        for decoder in decoders:  # warm-up
            e2e(decoder, pics[:batch_size])
        diff = pixel_difference(enc.transform, pics, batches, device, num_workers=workers)
        for _ in range(rounds):
            for decoder in decoders:
                rates[f"{decoder}_pixels"].append(pixels(decoder))
                rates[f"{decoder}_e2e"].append(e2e(decoder, pics))
        row = {"encoder": name, "images": len(pics), "batch_size": batch_size,
               "device": device.type, "num_workers": workers,
               **{f"{k}_images_per_s": float(statistics.median(v)) for k, v in rates.items()},
               **diff}
        row["speedup"] = row["torchvision_e2e_images_per_s"] / row["pil_e2e_images_per_s"]
        if log:
            log(f"{name}: pixels pil {row['pil_pixels_images_per_s']:.1f} / torchvision "
                f"{row['torchvision_pixels_images_per_s']:.1f} img/s; end to end pil "
                f"{row['pil_e2e_images_per_s']:.1f} / torchvision "
                f"{row['torchvision_e2e_images_per_s']:.1f} img/s ({row['speedup']:.2f}x)")
        rows.append(row)
    return rows


def pixel_difference(transform, images, batches: list[list[int]], device: torch.device, *,
                     num_workers: int = 0) -> dict:
    """How far ``features.image_decoder: torchvision`` pixels (decoded on ``device``: nvJPEG
    on CUDA) are from the reference ``pil`` ones, over every image of ``batches``, in
    normalised units (the encoder's input after its mean/std): ``pixel_mean_abs_diff`` (the
    mean of ``|tv - pil|`` over every value), ``pixel_max_abs_diff`` and ``pixel_rel_l2``
    (``||tv - pil|| / ||pil||``). With the same decoder (libjpeg-turbo on the CPU) only
    resampling differs: 1.3e-4 to 3.9e-4 of mean difference on tests/test_pixels.py's images,
    1.5e-3 to 3.1e-3 on flickr8k-mini's (docs/datasets.md); a decoder that rounds otherwise adds to it."""
    streams = [pixel_batches(transform, images, batches, device, num_workers=num_workers,
                             image_decoder=d) for d in ("pil", "torchvision")]
    total = peak = sq_diff = sq_ref = 0.0
    n = 0
    for ref, ours in zip(*streams, strict=True):
        d = (ours.float() - ref.float()).abs()
        total += float(d.sum(dtype=torch.float64))
        peak = max(peak, float(d.max()))
        sq_diff += float(d.double().square().sum())
        sq_ref += float(ref.double().square().sum())
        n += d.numel()
    return {"pixel_mean_abs_diff": total / max(n, 1), "pixel_max_abs_diff": peak,
            "pixel_rel_l2": (sq_diff / sq_ref) ** 0.5 if sq_ref else 0.0}


@dataclass
class StoreWorkload:
    """The sizes :func:`bench_store` works at: rows of a ``grid_size x grid_dim`` grid and a
    ``pooled_dim`` pooled vector (default ResNet-50's), ``shard_size`` rows a shard (None: as
    the harness chooses), ``batch_size`` rows a batch, ``read_batches`` batches read,
    ``train_steps`` training steps and ``decode_images`` images greedily captioned."""

    grid_size: int = 49
    grid_dim: int = 2048
    pooled_dim: int = 2048
    shard_size: int | None = None
    batch_size: int = 32
    train_steps: int = 20
    read_batches: int = 100
    decode_images: int = 128


def bench_store(n_images: int, device: torch.device, *, folder: str | None = None,
                workload: StoreWorkload | None = None, num_workers: int | None = None,
                arch: str = "attn_lstm", log=None) -> dict:
    """The feature store at scale: build a synthetic store of ``n_images`` rows of
    ``workload``'s shape (:class:`StoreWorkload`; default ResNet-50's, ``49 x 2048`` grid,
    ``2048`` pooled; float16) in a temp folder under ``folder`` (default: the system temp
    folder), then time, in this one process:

    * ``build_s``/``write_mb_per_s``: writing it shard by shard (:func:`write_shard`);
    * ``stats_s``: the streaming per-channel statistics over every row (``standardize``);
    * ``read_samples_per_s``: reading random rows, ``batch_size`` a batch, through
      :meth:`FeatureStore.batches` (``num_workers`` prefetching processes; default as the
      harness chooses);
    * ``train_samples_per_s``: ``train_steps`` of the trainer's cross-entropy steps
      (:func:`~benchmark.train.xe_step`) of ``arch`` at the Show-Attend-Tell sizes (512-d,
      10k words, 20 words) on random rows;
    * ``decode_captions_per_s``: greedy captions of ``decode_images`` random rows;
    * ``peak_rss_mb``: the process's peak resident memory over all of it, against
      ``in_memory_mb``, what holding the features in memory would take (the store's bytes).

    The store is deleted afterwards. Raises StorageError when ``folder`` lacks the room.
    """
    import shutil
    import tempfile
    from pathlib import Path


    say = log or (lambda *a, **k: None)
    sw = workload or StoreWorkload()
    grid_size, grid_dim, pooled_dim, batch_size = sw.grid_size, sw.grid_dim, sw.pooled_dim, sw.batch_size
    train_steps, read_batches, decode_images = sw.train_steps, sw.read_batches, sw.decode_images
    row_bytes = (grid_size * grid_dim + pooled_dim) * 2
    base = Path(folder or tempfile.gettempdir())
    ensure_writable(base, need_bytes=n_images * row_bytes + 2**28, what="store benchmark folder",
                    hint="Pass --store-dir with a folder that has room for the synthetic store.")
    root = Path(tempfile.mkdtemp(prefix="capbench-store-", dir=base))
    workers = default_num_workers() if num_workers is None else num_workers
    try:
        per = sw.shard_size or shard_images(row_bytes)
        g = torch.Generator().manual_seed(0)
        grid = torch.randn(per, grid_size, grid_dim, generator=g).half()
        pooled = torch.randn(per, pooled_dim, generator=g).half()
        t0 = time.perf_counter()
        names = []
        for s, first in enumerate(range(0, n_images, per)):
            k = min(per, n_images - first)
            names.append(f"shard-{s:05d}.safetensors")
            write_shard(root / names[-1], grid[:k], pooled[:k], list(range(first, first + k)),
                        first)
        write_manifest(root, "synthetic", {"encoder": "synthetic"}, per, names,
                       list(range(n_images)))
        build_s = time.perf_counter() - t0
        del grid, pooled
        say(f"store of {n_images:,} rows written in {build_s:.1f} s")
        store = open_store(root)
        t0 = time.perf_counter()
        store.standardize(torch.arange(n_images))
        stats_s = time.perf_counter() - t0
        say(f"statistics in {stats_s:.1f} s")
        rows = torch.randint(0, n_images, (max(read_batches, train_steps), batch_size),
                             generator=g)
        t0 = time.perf_counter()
        for _ in store.batches(list(rows[:read_batches]), "cpu", workers):
            pass
        read_s = time.perf_counter() - t0
        w = DecoderWorkload(grid_size=grid_size, grid_dim=grid_dim, pooled_dim=pooled_dim,
                            batch_size=batch_size)
        torch.manual_seed(0)
        dec = create_decoder(arch, w.vocab_size, grid_dim, pooled_dim, _decoder_hparams(w),
                             strict=False).to(device)
        ctx = _trainer_step(dec, device, device.type == "cuda")
        T = w.caption_len + 1
        tokens = torch.randint(4, w.vocab_size, (batch_size, T), generator=g).to(device)
        targets = torch.randint(4, w.vocab_size, (batch_size, T), generator=g).to(device)
        batch = CaptionTable(tokens, targets, torch.full((batch_size,), T))
        dec.train()
        batches = store.batches(list(rows[:train_steps]), device, workers)
        t0 = None
        for step, (gr, po) in enumerate(batches):
            if step == 1:  # the first step warms up
                synchronize(device)
                t0 = time.perf_counter()
            xe_step(ctx, gr, po, batch)  # the trainer's step
        synchronize(device)
        train_s = time.perf_counter() - t0
        dec.eval()
        pick = torch.randint(0, n_images, (decode_images,), generator=g)
        t0 = time.perf_counter()
        with torch.no_grad():
            for gr, po in store.batches(list(pick.split(batch_size)), device, workers):
                greedy_decode(dec, gr, po, max_len=w.caption_len)
        synchronize(device)
        decode_s = time.perf_counter() - t0
        return {"images": n_images, "store_gb": store.nbytes / 1e9, "shards": len(names),
                "shard_size": per, "build_s": build_s,
                "write_mb_per_s": store.nbytes / 1e6 / build_s, "stats_s": stats_s,
                "read_samples_per_s": read_batches * batch_size / read_s,
                "train_samples_per_s": (train_steps - 1) * batch_size / train_s,
                "decode_captions_per_s": decode_images / decode_s,
                "peak_rss_mb": peak_memory_mb(torch.device("cpu")),
                "in_memory_mb": store.nbytes / 2**20, "num_workers": workers, "arch": arch,
                "device": str(device)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- what ``capbench bench`` asks for, checked, and its results as text ---------------------

def check_workload(w: DecoderWorkload, iters: int, encoder_batch_size: int | None,
                   encoder_flag: str = "--encoder-batch-size") -> None:
    """Refuse a workload dimension, ``iters`` or ``encoder_batch_size`` (the option
    ``encoder_flag``) outside its range (ConfigError naming the flag, e.g. ``--batch-size 0:
    give 1 to 65,536``)."""
    for name, value, low, high in (
            ("--batch-size", w.batch_size, 1, 65_536), ("--iters", iters, 1, 10_000),
            ("--beam-size", w.beam_size, 1, 256), ("--caption-len", w.caption_len, 1, 1024),
            ("--grid-size", w.grid_size, 1, 65_536), ("--grid-dim", w.grid_dim, 1, 65_536),
            ("--pooled-dim", w.pooled_dim, 1, 65_536), ("--vocab-size", w.vocab_size, 5, 1_000_000),
            ("--embed-dim", w.embed_dim, 1, 65_536), ("--hidden-dim", w.hidden_dim, 1, 65_536),
            ("--attention-dim", w.attention_dim, 1, 65_536), ("--num-layers", w.num_layers, 1, 64),
            ("--num-heads", w.num_heads, 1, 256),
            (encoder_flag, 1 if encoder_batch_size is None else encoder_batch_size, 1,
             65_536)):
        if not low <= value <= high:
            raise ConfigError(f"{name} {value}: give {low} to {high:,}")


def bench_models(archs: str | None, encoders: str | None, w: DecoderWorkload, device: str, *,
                 iters: int = 5, peak: bool = False, compile: bool = False,
                 encoder_batch_size: int | None = None, encoder_flag: str = "--encoder-batch-size",
                 log=None) -> tuple[list[dict], torch.device]:
    """``capbench bench decoders|encoders``: :func:`run_bench` of the named decoders and encoders.

    Args:
        archs: decoders, a comma-separated list of names, ``all``, or None for none.
        encoders: encoders, likewise.
        w: the decoders' synthetic workload (sizes checked by :func:`check_workload`).
        device: a device spec such as ``auto``, ``cpu`` or ``cuda:1``
            (:func:`~benchmark.device.select_device`).
        iters: timed iterations (median reported), 1 to 10,000.
        peak: also measure the matmul peak and report utilisation (see :func:`run_bench`).
        compile: also time the decoders' training step through ``torch.compile``.
        encoder_batch_size: images per encoder batch (None: ``min(w.batch_size, 16)``).
        encoder_flag: the option that set ``encoder_batch_size``, named in its error.
        log: ``log(text)`` is told the progress (None: silent).

    Returns:
        ``(rows, device)``: :func:`run_bench`'s rows and the device they ran on.

    Raises:
        ConfigError: neither ``archs`` nor ``encoders`` is named, a size is out of range
            (:func:`check_workload`) or the device is unavailable.
        ResourceError: the workload would not fit in memory.
    """
    if not archs and not encoders:
        raise ConfigError("give --arch and/or --encoder (a name, a comma-separated list, or "
                          "'all'), or --reward")
    check_workload(w, iters, encoder_batch_size, encoder_flag)
    dev = select_device(device)
    check_memory(w.memory_bytes(), "this decoder workload", "give smaller sizes (--batch-size, "
                 "--grid-size, --grid-dim, --vocab-size, --caption-len)")
    names = list_decoders() if archs == "all" else [a for a in (archs or "").split(",") if a]
    encs = (list_encoders(ci=False) if encoders == "all"
            else [e for e in (encoders or "").split(",") if e])
    rows = run_bench(names, encs, w, dev, iters=iters, log=log, peak=peak, compile=compile,
                     encoder_batch_size=encoder_batch_size)
    return rows, dev


def rows_frame(rows: list[dict]) -> pd.DataFrame:
    """Bench rows as one DataFrame (decoder and encoder rows merged: ints stay ints)."""
    return pd.DataFrame(rows).convert_dtypes()


def table_cells(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The terminal table of bench rows: its columns (:func:`table_columns`) and each row's
    cells as text (``-`` for a figure the row lacks, floats to one decimal)."""
    show = table_columns(df.columns)
    cells = [["-" if pd.isna(v) else f"{v:,.1f}" if isinstance(v, float) else str(v) for v in r]
             for _, r in df[show].iterrows()]
    return show, cells


def parse_gemm(text: str) -> list[tuple[int, int, int]]:
    """``32x2048x2048,4096x4096x4096`` as ``[(m, k, n), ...]``; ConfigError for a part that is
    not three integers >= 1."""
    shapes = []
    for part in text.split(","):
        try:
            m, k, n = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--gemm {part!r}: give M x K x N as three integers, e.g. "
                              "32x2048x2048") from None
        if min(m, k, n) < 1:
            raise ConfigError(f"--gemm {part!r}: every dimension must be at least 1")
        shapes.append((m, k, n))
    return shapes


def bench_gemm(shapes: str, device: str, iters: int = 5) -> list[dict]:
    """``capbench bench gemm``: fp32 GFLOP/s (:func:`matmul_rate`, best of ``max(3, iters)``)
    of each product in ``shapes`` (:func:`parse_gemm`) on ``device`` (a spec)."""
    parsed = parse_gemm(shapes)
    dev = select_device(device)
    return [{"m": m, "k": k, "n": n, "gflops": matmul_rate(m, k, n, dev, iters=max(3, iters))}
            for m, k, n in parsed]


def gemm_summary(rows: list[dict]) -> str:
    """One line of :func:`bench_gemm`'s rates."""
    return "  ".join(f"({r['m']}x{r['k']}) @ ({r['k']}x{r['n']}): {r['gflops']:.0f} GFLOP/s"
                     for r in rows)


def check_store_size(n_images: int) -> None:
    """ConfigError for a store benchmark of fewer than 2 images."""
    if n_images < 2:
        raise ConfigError(f"--store {n_images}: give the number of images, at least 2 (e.g. 10000)")


def store_summary(res: dict) -> str:
    """One line of :func:`bench_store`'s figures."""
    return (f"feature store of {res['images']:,} images ({res['store_gb']:.1f} GB, "
            f"{res['shards']} shards): peak RSS {res['peak_rss_mb']:,.0f} MB (in memory "
            f"it would be {res['in_memory_mb']:,.0f} MB); written at "
            f"{res['write_mb_per_s']:,.0f} MB/s, statistics in {res['stats_s']:.1f} s; "
            f"samples/s: read {res['read_samples_per_s']:,.0f}, train "
            f"{res['train_samples_per_s']:,.1f} ({res['arch']}), greedy decode "
            f"{res['decode_captions_per_s']:,.1f}")


def check_extraction(images: int, batch_size: int, iters: int, num_workers: int | None) -> None:
    """ConfigError for an extraction benchmark's count below its minimum."""
    for name, value in (("--images", images), ("--batch-size", batch_size), ("--iters", iters)):
        if value < 1:
            raise ConfigError(f"{name} {value}: must be at least 1")
    if num_workers is not None and num_workers < 0:
        raise ConfigError(f"--num-workers {num_workers}: must be at least 0")


def extraction_names(encoders: str | None) -> list[str]:
    """The encoders an extraction benchmark times: ``all`` (the full-size ones), a
    comma-separated list, or ``resnet50`` when none is named."""
    if encoders == "all":
        return list_encoders(ci=False)
    return [e for e in (encoders or "resnet50").split(",") if e]


def extraction_summary(rows: list[dict], rounds: int) -> str:
    """One line per encoder of :func:`bench_extraction`'s rows."""
    return "\n".join(
        f"{r['encoder']}: {r['images']} images at batch {r['batch_size']} on {r['device']} "
        f"({r['num_workers']} workers), images/s, median of {rounds} alternating rounds: "
        f"pixels alone pil {r['pil_pixels_images_per_s']:.1f}, torchvision "
        f"{r['torchvision_pixels_images_per_s']:.1f}; end to end pil "
        f"{r['pil_e2e_images_per_s']:.1f}, torchvision {r['torchvision_e2e_images_per_s']:.1f}"
        f" ({r['speedup']:.2f}x); pixels apart by {r['pixel_mean_abs_diff']:.2e} on average"
        f" (largest {r['pixel_max_abs_diff']:.2f})" for r in rows)


def reward_summary(res: dict, dataset_spec: str) -> str:
    """One line of :func:`bench_reward`'s figures."""
    return (f"SCST reward on {dataset_spec} ({res['captions']:,} captions against "
            f"{res['references']:,} train references of {res['train_images']} images): "
            f"capbench CiderD {res['capbench_CiderD_captions_per_s']:,.0f} captions/s "
            f"(document frequencies built once in {res['ciderd_build_s']:.2f} s), "
            f"pycocoevalcap Cider {res['pycocoevalcap_Cider_captions_per_s']:,.0f} "
            "captions/s; median of 3 alternating rounds")
