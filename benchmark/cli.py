"""``capbench``: the command-line interface (Typer + rich)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from benchmark.errors import CapbenchError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark image-captioning encoders x decoders on one harness.")
data_app = typer.Typer(no_args_is_help=True, help="Write the embedded datasets to disk.")
app.add_typer(data_app, name="data")
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = 2):
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _guard(fn):
    """Turn user errors into one clear message and exit status 2 (no traceback)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from architectures.encoders import EncoderWeightsError
        from architectures.registry import UnknownModelError

        try:
            return fn(*args, **kwargs)
        except (CapbenchError, UnknownModelError, EncoderWeightsError) as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted; records already written are kept", 130)

    return wrapper


@app.command()
@_guard
def run(
    arch: Annotated[str | None, typer.Option(help="decoder: rnn, lstm, attn_lstm, transformer")] = None,
    encoder: Annotated[str | None, typer.Option(help="encoder: resnet50, vit_b16, clip_vit_b32 (aliases resnet, vit, clip)")] = None,
    dataset: Annotated[str | None, typer.Option(help="'shapes' (embedded) or a Karpathy dataset.json")] = None,
    config: Annotated[str | None, typer.Option(help="preset name in configs/ (demo, tiny, coco-mini, flickr8k-mini) or a YAML path")] = None,
    epochs: Annotated[int | None, typer.Option(help="training epochs")] = None,
    batch_size: Annotated[int | None, typer.Option(help="training batch size")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed of the decoder and data order")] = None,
    beam_size: Annotated[int | None, typer.Option(help="beam size for the test captions (1 = greedy)")] = None,
    device: Annotated[str | None, typer.Option(help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")] = None,
    pretrained: Annotated[bool | None, typer.Option("--pretrained/--no-pretrained", help="pretrained encoder weights, or a seeded random init")] = None,
    weights: Annotated[Path | None, typer.Option(help="local encoder weights file (.safetensors/.pt/.pth)")] = None,
    results_dir: Annotated[Path | None, typer.Option(help="where run records go (default results/)")] = None,
):
    """Train a decoder on frozen encoder features, score it on the test split, write a run record."""
    from benchmark.config import load_config
    from benchmark.runner import run_experiment

    cfg = load_config(config, {
        "arch": arch, "encoder": encoder, "dataset": dataset, "train.epochs": epochs,
        "train.batch_size": batch_size, "seed": seed, "decode.beam_size": beam_size,
        "device": device, "pretrained": pretrained, "weights": str(weights) if weights else None,
        "results_dir": str(results_dir) if results_dir else None,
    })
    console.rule(f"capbench run: {cfg.arch} on {cfg.encoder} ({cfg.dataset})")
    record, path = run_experiment(cfg, console)
    _print_run_summary(record, path)


def _print_run_summary(record: dict, path: Path) -> None:
    from benchmark.report import leaderboard, render_rich

    render_rich(leaderboard([record]), console)
    for m, why in record.get("metrics_unavailable", {}).items():
        console.print(f"[yellow]{m} unavailable:[/] {why}", highlight=False)
    tp = record["throughput"]
    console.print(f"train {tp['train_tokens_per_s']:.0f} tokens/s, inference "
                  f"{tp['inference_images_per_s']:.1f} images/s (from pixels), decoder "
                  f"{tp['decoder_captions_per_s']:.0f} captions/s; wall "
                  f"{record['wall_seconds']:.0f} s")
    console.print(f"run record: {path}")


@app.command()
@_guard
def report(
    results_dir: Annotated[Path, typer.Option(help="folder holding runs/*.json")] = Path("results"),
    format: Annotated[str, typer.Option("--format", help="table, markdown, csv or json")] = "table",
    output: Annotated[Path | None, typer.Option(help="write to this file instead of the terminal")] = None,
):
    """Show every run as a leaderboard grouped by dataset and split fingerprint."""
    from benchmark.records import load_records
    from benchmark.report import leaderboard, render, render_rich

    if format not in ("table", "markdown", "csv", "json"):
        _fail(f"--format {format!r}: choose table, markdown, csv or json")
    records, problems = load_records(results_dir)
    for p in problems:
        err.print(f"[yellow]skipped:[/] {p}", highlight=False)
    df = leaderboard(records)
    if format == "table" and output is None:
        render_rich(df, console)
        return
    text = render(df, "markdown" if format == "table" else format)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        console.print(f"wrote {output} ({len(df)} runs)")
    else:
        sys.stdout.write(text)


@app.command("list")
@_guard
def list_models(
    pattern: Annotated[str, typer.Argument(help="shell wildcard on names, e.g. '*vit*'")] = "*",
):
    """List registered encoders and decoders with feature shapes and parameter counts."""
    import torch

    from architectures import create_encoder, get_entry, list_decoders, list_encoders
    from benchmark.runner import build_decoder

    enc_table = Table(title="encoders (random init to count parameters; nothing is downloaded)")
    for c in ("name", "aliases", "grid (N x D)", "pooled", "params", "description"):
        enc_table.add_column(c)
    dims = None
    for name in list_encoders(pattern):
        entry = get_entry("encoder", name)
        enc = create_encoder(name, pretrained=False)
        dims = dims or enc
        n = sum(p.numel() for p in enc.parameters())
        enc_table.add_row(name, ", ".join(entry.aliases), f"{enc.grid_size} x {enc.grid_dim}",
                          str(enc.pooled_dim), f"{n / 1e6:.1f}M", entry.description)
        del enc
    console.print(enc_table)
    dec_table = Table(title="decoders (params for a 2048-d 7x7 grid and a 10k vocabulary)")
    for c in ("name", "aliases", "params", "description"):
        dec_table.add_column(c)

    class _Grid:  # the Show-Attend-Tell setting, to give comparable parameter counts
        grid_dim = pooled_dim = 2048

    for name in list_decoders(pattern):
        entry = get_entry("decoder", name)
        with torch.device("meta"):
            dec, _ = build_decoder(name, 10000, _Grid, {})
        dec_table.add_row(name, ", ".join(entry.aliases), f"{dec.num_parameters() / 1e6:.1f}M",
                          entry.description)
    console.print(dec_table)


@app.command()
@_guard
def baseline(
    dataset: Annotated[str, typer.Option(help="'shapes' or a Karpathy dataset.json")] = "shapes",
    split: Annotated[str, typer.Option(help="split to score")] = "test",
):
    """Score the blind baseline: the most frequent training caption for every image."""
    from benchmark.baselines import blind_predictions, most_frequent_caption
    from benchmark.metrics import score_captions
    from benchmark.runner import resolve_dataset

    ds = resolve_dataset(dataset)
    result = score_captions(blind_predictions(ds, split), ds.references(split))
    table = Table(title=f"blind baseline on {ds.name} {split}: {most_frequent_caption(ds)!r}")
    for m in result.metrics:
        table.add_column(m, justify="right")
    table.add_row(*("n/a" if v is None else f"{100 * v:.1f}" for v in result.metrics.values()))
    console.print(table)


@data_app.command("shapes")
@_guard
def data_shapes(
    out: Annotated[Path, typer.Option(help="output folder (dataset.json + images/)")],
    n_images: Annotated[int, typer.Option(help="number of images")] = 600,
    seed: Annotated[int, typer.Option(help="generator seed")] = 0,
):
    """Generate the embedded 'shapes' dataset in Karpathy format."""
    from benchmark.shapes import generate_shapes

    if n_images < 10:
        _fail("--n-images must be at least 10")
    path = generate_shapes(out, n_images, seed)
    console.print(f"wrote {path} ({n_images} images)")


def main() -> None:  # pragma: no cover
    app()
