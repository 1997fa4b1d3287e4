"""``capbench``: the command-line interface (Typer + rich)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from benchmark.errors import CapbenchError

QUICKSTART = """Quickstart:
  capbench run --config demo          train and score the demo model on the embedded `shapes` set
  capbench report                     the leaderboard of every run in results/
  capbench eval PREDS.json --references coco-val2014   score captions made by any codebase"""

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="Benchmark image-captioning encoders x decoders on one harness.")
data_app = typer.Typer(no_args_is_help=True, help="Write the embedded datasets to disk.")
app.add_typer(data_app, name="data")
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = 2):
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    err.print(f"[bold yellow]warning:[/] {message}", highlight=False)


@app.callback(invoke_without_command=True)
def _main(ctx: typer.Context):
    """Benchmark image-captioning encoders x decoders on one harness."""
    import tempfile
    import warnings

    from benchmark.errors import CapbenchWarning
    from benchmark.fsutil import remove_stale_temps

    warnings.showwarning = _show_warning
    warnings.simplefilter("always", CapbenchWarning)
    remove_stale_temps(tempfile.gettempdir())  # scratch folders of killed capbench processes
    if ctx.invoked_subcommand is None:
        console.print(QUICKSTART, highlight=False)
        console.print()
        console.print(ctx.get_help())
        raise typer.Exit(0)


def _guard(fn):
    """Turn user errors into one clear message and exit status 2 (no traceback)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from architectures.errors import ArchitectureError

        try:
            return fn(*args, **kwargs)
        except (CapbenchError, ArchitectureError) as exc:
            _fail(str(exc))
        except OSError as exc:  # a file or folder the user named: unreadable, read-only, full
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(f"{where}{exc.strerror or exc}")
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
    seeds: Annotated[str | None, typer.Option(help="repeat the run over these seeds, e.g. 0,1,2 (report --aggregate shows mean ± std)")] = None,
    beam_size: Annotated[int | None, typer.Option(help="beam size for the test captions (1 = greedy)")] = None,
    device: Annotated[str | None, typer.Option(help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")] = None,
    pretrained: Annotated[bool | None, typer.Option("--pretrained/--no-pretrained", help="pretrained encoder weights, or a seeded random init")] = None,
    weights: Annotated[Path | None, typer.Option(help="local encoder weights file (.safetensors/.pt/.pth)")] = None,
    results_dir: Annotated[Path | None, typer.Option(help="where run records go (default results/)")] = None,
):
    """Train a decoder on frozen encoder features, score it on the test split, write a run record."""
    from benchmark.config import load_config
    from benchmark.runner import run_seeds

    cfg = load_config(config, {
        "arch": arch, "encoder": encoder, "dataset": dataset, "train.epochs": epochs,
        "train.batch_size": batch_size, "seed": seed, "decode.beam_size": beam_size,
        "device": device, "pretrained": pretrained, "weights": str(weights) if weights else None,
        "results_dir": str(results_dir) if results_dir else None,
    })
    seed_list = _parse_seeds(seeds) if seeds else [cfg.seed]

    def on_start(s: int) -> None:
        console.rule(f"capbench run: {cfg.arch} on {cfg.encoder} ({cfg.dataset}), seed {s}")

    for record, path in run_seeds(cfg, seed_list, console, on_start):
        _print_run_summary(record, path)


def _parse_seeds(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"--seeds {text!r}: give integers separated by commas, e.g. 0,1,2")
    if not out:
        _fail("--seeds is empty")
    return out


def _print_run_summary(record, path: Path) -> None:
    from benchmark.report import leaderboard, render_rich

    render_rich(leaderboard([record]), console)
    for m, why in record.metrics_unavailable.items():
        console.print(f"[yellow]{m} unavailable:[/] {why}", highlight=False)
    tp = record.throughput
    console.print(f"train {tp['train_tokens_per_s']:.0f} tokens/s, inference "
                  f"{tp['inference_images_per_s']:.1f} images/s (from pixels), decoder "
                  f"{tp['decoder_captions_per_s']:.0f} captions/s; wall "
                  f"{record.wall_seconds:.0f} s")
    console.print(f"run record: {path}")


@app.command()
@_guard
def report(
    results_dir: Annotated[Path, typer.Option(help="folder holding runs/*.json")] = Path("results"),
    format: Annotated[str, typer.Option("--format", help="table, markdown, csv or json")] = "table",
    output: Annotated[Path | None, typer.Option(help="write to this file instead of the terminal")] = None,
    aggregate: Annotated[bool, typer.Option(help="fold runs that differ only in seed into mean ± std rows")] = False,
    plot: Annotated[Path | None, typer.Option(help="write PNG plots here (quality vs throughput with Pareto front, per-metric bars)")] = None,
    leaderboard_file: Annotated[bool, typer.Option("--leaderboard-file/--no-leaderboard-file", help="also write <results-dir>/LEADERBOARD.md")] = True,
    columns: Annotated[str | None, typer.Option(help="table columns, comma-separated, e.g. B@1,B@4,CIDEr-D,img/s (display names or keys such as Bleu_4, CIDEr, train_tokens_per_s; any case); run, decoder, encoder and CIDEr-D are always shown")] = None,
    wide: Annotated[bool, typer.Option("--wide", help="table: every column (any that do not fit the terminal are named under the table)")] = False,
):
    """Show every run as a leaderboard grouped by dataset and split fingerprint.

    Also writes <results-dir>/LEADERBOARD.md (markdown) unless --no-leaderboard-file."""
    from benchmark.report import load_board, render, render_rich, resolve_columns, write_leaderboard_file

    if format not in ("table", "markdown", "csv", "json"):
        _fail(f"--format {format!r}: choose table, markdown, csv or json")
    cols = [c for c in columns.split(",") if c.strip()] if columns is not None else None
    if cols is not None:
        resolve_columns(cols)  # an unknown name fails before plots/LEADERBOARD.md are written
    df, runs, problems = load_board(results_dir, aggregate)
    for p in problems:
        err.print(f"[yellow]skipped:[/] {p}", highlight=False)
    if plot is not None and not runs.empty:
        from benchmark.plots import write_plots

        try:
            for p in write_plots(runs, plot):
                err.print(f"wrote {p}")
        except OSError as exc:
            _fail(f"cannot write the plots to --plot {plot}: {exc.strerror or exc}")
    if leaderboard_file and not df.empty:
        try:
            write_leaderboard_file(df, results_dir)
        except OSError as exc:
            err.print(f"[yellow]warning:[/] could not write {results_dir / 'LEADERBOARD.md'} "
                      f"({exc.strerror or exc}); pass --no-leaderboard-file to skip it", highlight=False)
    if format == "table" and output is None:
        render_rich(df, console, columns=cols, wide=wide)
        return
    text = render(df, "markdown" if format == "table" else format)
    if output:
        from benchmark.fsutil import atomic_write_text

        try:
            atomic_write_text(output, text)
        except OSError as exc:
            _fail(f"cannot write --output {output}: {exc.strerror or exc}")
        console.print(f"wrote {output} ({len(df)} runs)")
    else:
        sys.stdout.write(text)


@app.command("eval")
@_guard
def evaluate(
    predictions: Annotated[Path, typer.Argument(help="COCO results JSON: [{image_id, caption}, ...]")],
    references: Annotated[str, typer.Option(help="Karpathy dataset.json, COCO captions JSON, or coco-val2014 / coco-train2014 (offline copy in pycocoevalcap)")],
    split: Annotated[str, typer.Option(help="split of a Karpathy references file")] = "test",
    format: Annotated[str, typer.Option("--format", help="table or json")] = "table",
):
    """Score any COCO-format predictions file exactly as the COCO caption toolkit does."""
    import json

    from benchmark.references import evaluate_file

    if format not in ("table", "json"):
        _fail(f"--format {format!r}: choose table or json")
    ev = evaluate_file(predictions, references, split)
    if format == "json":
        sys.stdout.write(json.dumps(ev.to_json(), indent=1) + "\n")
        return
    table = Table(title=f"{predictions.name}: {ev.images} captions vs {references}")
    for c in ("metric", "score", "95% CI"):
        table.add_column(c, justify="right")
    for m, v in ev.result.metrics.items():
        lo_hi = ev.confidence_intervals.get(m)
        table.add_row(m, "unavailable" if v is None else f"{v:.3f}",
                      f"[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else "-")
    console.print(table)
    if ev.missing_references:
        console.print(f"[bold yellow]warning:[/] {ev.missing_references} of "
                      f"{ev.images + ev.missing_references} reference images have no prediction; "
                      f"the scores cover only the {ev.images} predicted images", highlight=False)
    for m, why in ev.result.unavailable.items():
        console.print(f"[yellow]{m} unavailable:[/] {why}", highlight=False)
    console.print(f"scored in {ev.seconds:.1f} s")


@app.command()
@_guard
def compare(
    run_a: Annotated[str, typer.Argument(help="run id (or unique prefix/suffix) or record path")],
    run_b: Annotated[str, typer.Argument(help="run id (or unique prefix/suffix) or record path")],
    results_dir: Annotated[Path, typer.Option(help="folder holding runs/*.json")] = Path("results"),
    resamples: Annotated[int, typer.Option(help="bootstrap resamples")] = 2000,
):
    """Paired bootstrap test of run B against run A on the same test images."""
    from benchmark.records import find_record
    from benchmark.report import METRIC_COLUMNS
    from benchmark.stats import compare_runs

    if resamples < 1:
        _fail(f"--resamples {resamples}: give at least 1 (2000 is usual)")
    a, b = find_record(run_a, results_dir), find_record(run_b, results_dir)
    result = compare_runs(a, b, n_resamples=resamples)
    table = Table(title=f"B - A, paired bootstrap over {len(a.per_image['image_ids'])} "
                  f"images ({resamples} resamples)", caption=f"A = {a.run_id}\nB = {b.run_id}")
    for c in ("metric", "A", "B", "B - A", "95% CI", "p"):
        table.add_column(c, justify="right")
    for m in (m for m in METRIC_COLUMNS if m in result):
        r = result[m]
        table.add_row(m, f"{100 * a.metrics[m]:.1f}", f"{100 * b.metrics[m]:.1f}",
                      f"{100 * r['delta']:+.1f}", f"[{100 * r['ci'][0]:+.1f}, {100 * r['ci'][1]:+.1f}]",
                      f"{r['p']:.3f}")
    console.print(table)
    if "METEOR_image_mean" in result:
        r = result["METEOR_image_mean"]
        console.print(f"[yellow]METEOR:[/] a record predates per-image METEOR statistics; mean of "
                      f"per-image METEOR B - A {100 * r['delta']:+.1f} [{100 * r['ci'][0]:+.1f}, "
                      f"{100 * r['ci'][1]:+.1f}], p {r['p']:.3f} (not the corpus METEOR)", highlight=False)


@app.command()
@_guard
def doctor():
    """What works on this machine: versions, devices, Java metrics, caches, local weights."""
    from benchmark.doctor import doctor_rows

    t = Table(title="capbench doctor", show_header=False)
    t.add_column("item")
    t.add_column("status")
    for item, status in doctor_rows():
        t.add_row(item, status)
    console.print(t)


@app.command()
@_guard
def matrix(
    archs: Annotated[str | None, typer.Option(help="decoders, comma-separated (default: the config's matrix or all registered)")] = None,
    encoders: Annotated[str | None, typer.Option(help="encoders, comma-separated (default: the config's matrix or the full-size ones)")] = None,
    config: Annotated[str | None, typer.Option(help="preset or YAML; its optional `matrix:` section gives archs/encoders/seeds")] = None,
    seeds: Annotated[str | None, typer.Option(help="seeds, e.g. 0,1,2")] = None,
    dataset: Annotated[str | None, typer.Option(help="'shapes' or a Karpathy dataset.json")] = None,
    epochs: Annotated[int | None, typer.Option(help="training epochs per cell")] = None,
    pretrained: Annotated[bool | None, typer.Option("--pretrained/--no-pretrained", help="pretrained encoder weights or a seeded random init")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, mps")] = None,
    results_dir: Annotated[Path | None, typer.Option(help="where run records go")] = None,
):
    """Run every decoder x encoder (x seed) cell on one split; resumable; ends with the leaderboard."""
    from benchmark.config import load_config
    from benchmark.matrix import matrix_plan, run_matrix
    from benchmark.records import load_records
    from benchmark.report import leaderboard, render_rich

    cfg = load_config(config, {"dataset": dataset, "train.epochs": epochs, "pretrained": pretrained,
                               "device": device,
                               "results_dir": str(results_dir) if results_dir else None})
    plan = matrix_plan(config, archs.split(",") if archs else None,
                       encoders.split(",") if encoders else None,
                       _parse_seeds(seeds) if seeds else None, cfg.seed)
    counter = {"n": 0}

    def on_cell(cell):
        counter["n"] += 1
        colour = {"ok": "green", "done": "cyan", "failed": "red"}[cell.status]
        extra = f"  {cell.error}" if cell.error else f"  {cell.seconds:.0f} s" if cell.seconds else ""
        console.print(f"[bold]matrix {counter['n']}/{plan.size}[/] {cell.arch} x {cell.encoder} seed "
                      f"{cell.seed}: [{colour}]{cell.status}[/]{extra}", highlight=False)

    result = run_matrix(cfg, plan.archs, plan.encoders, plan.seeds, console, on_cell)
    records, _ = load_records(cfg.results_dir)
    ids = {c.run_id for c in result.cells if c.run_id}
    render_rich(leaderboard([r for r in records if r.run_id in ids]), console)
    for enc, sec in result.feature_seconds.items():
        console.print(f"features {enc}: {sec:.0f} s (once, shared by its decoders)")
    console.print(f"matrix: {plan.size} cells, {result.count('ok')} run, {result.count('done')} "
                  f"already done, {result.count('failed')} failed; wall {result.wall_seconds / 60:.1f} min")
    if result.count("failed"):
        console.print(f"[red]failures recorded in {Path(cfg.results_dir) / 'failures'}[/]")
        raise typer.Exit(1)


@app.command()
@_guard
def check(
    baseline: Annotated[Path, typer.Option(help="baseline JSON to compare with")] = Path("results/baselines/tiny.json"),
    update: Annotated[bool, typer.Option(help="write the measured figures as the new baseline instead of comparing")] = False,
    preset: Annotated[str, typer.Option(help="preset the cells run (when updating)")] = "tiny",
):
    """Regression check: run the tiny preset per decoder (and a few encoders) and compare with
    the baseline. Metrics below baseline - tolerance fail; throughput changes are only printed."""
    from benchmark.check import default_cells, run_cells, run_check, write_baseline

    if update:
        records = run_cells(preset, default_cells(), None)
        write_baseline(baseline, preset, records)
        console.print(f"wrote baseline {baseline} ({len(records)} cells)")
        return
    outcome = run_check(baseline)
    table = Table(title=f"capbench check vs {baseline}")
    for c in ("cell", "figure", "baseline", "now", "tolerance", "status"):
        table.add_column(c, justify="right" if c in ("baseline", "now", "tolerance") else "left")
    colours = {"ok": "green", "FAIL": "bold red", "slower": "yellow", "faster": "cyan"}
    for r in outcome.rows:
        table.add_row(r.cell, r.name, r.show(r.baseline), r.show(r.now),
                      "-" if r.tolerance is None else f"{r.tolerance:.3f}",
                      f"[{colours.get(r.status, 'white')}]{r.status}[/]")
    console.print(table)
    console.print(f"check: {outcome.cells} cells in {outcome.seconds:.0f} s; {len(outcome.failed)} metric "
                  f"regression(s); {len(outcome.slower)} throughput figure(s) >30% slower "
                  "(printed only: CI machines are noisy)")
    if outcome.failed:
        for r in outcome.failed:
            err.print(f"[red]regression:[/] {r.cell} {r.name} {r.now:.4f} < baseline {r.baseline:.4f} "
                      f"- tolerance {r.tolerance:.3f}", highlight=False)
        raise typer.Exit(1)


@app.command()
@_guard
def bench(
    arch: Annotated[str | None, typer.Option(help="decoder(s) to time on synthetic features, comma-separated, or 'all'")] = None,
    encoder: Annotated[str | None, typer.Option(help="encoder(s) to time on random pixels, comma-separated, or 'all'")] = None,
    grid_size: Annotated[int, typer.Option(help="grid tokens N (196 = 14x14)")] = 196,
    grid_dim: Annotated[int, typer.Option(help="grid feature dim D")] = 2048,
    pooled_dim: Annotated[int | None, typer.Option(help="pooled feature dim (default: grid_dim)")] = None,
    vocab_size: Annotated[int, typer.Option(help="vocabulary size")] = 10000,
    batch_size: Annotated[int, typer.Option(help="batch size")] = 32,
    caption_len: Annotated[int, typer.Option(help="words per caption")] = 20,
    embed_dim: Annotated[int, typer.Option(help="word embedding dim (d_model for transformer)")] = 512,
    hidden_dim: Annotated[int, typer.Option(help="RNN hidden dim / transformer FFN dim")] = 512,
    attention_dim: Annotated[int, typer.Option(help="soft-attention dim")] = 512,
    num_layers: Annotated[int, typer.Option(help="decoder layers")] = 1,
    num_heads: Annotated[int, typer.Option(help="transformer heads")] = 8,
    beam_size: Annotated[int, typer.Option(help="beam size for the beam-K figure")] = 5,
    iters: Annotated[int, typer.Option(help="timed iterations (median reported)")] = 5,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, mps")] = "auto",
    format: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
    output: Annotated[Path | None, typer.Option(help="also write the rows as CSV here")] = None,
):
    """Time decoders on synthetic features and encoders on random pixels (defaults: the
    Show-Attend-Tell setting: 196 x 2048 grid, 512-d, 10k words, batch 32, 20 words)."""
    import json

    import pandas as pd

    from architectures import list_decoders, list_encoders
    from benchmark.bench import DecoderWorkload, run_bench, table_columns
    from benchmark.device import select_device

    if format not in ("table", "csv", "json"):
        _fail(f"--format {format!r}: choose table, csv or json")
    if not arch and not encoder:
        _fail("give --arch and/or --encoder (a name, a comma-separated list, or 'all')")
    for name, value, low in (("--batch-size", batch_size, 1), ("--iters", iters, 1),
                             ("--beam-size", beam_size, 1), ("--caption-len", caption_len, 1),
                             ("--grid-size", grid_size, 1), ("--grid-dim", grid_dim, 1),
                             ("--vocab-size", vocab_size, 5)):
        if value < low:
            _fail(f"{name} {value}: must be at least {low}")
    dev = select_device(device)
    w = DecoderWorkload(grid_size, grid_dim, pooled_dim or grid_dim, vocab_size, batch_size,
                        caption_len, embed_dim, hidden_dim, attention_dim, num_layers, num_heads,
                        beam_size)
    archs = list_decoders() if arch == "all" else [a for a in (arch or "").split(",") if a]
    encs = list_encoders(ci=False) if encoder == "all" else [e for e in (encoder or "").split(",") if e]
    rows = run_bench(archs, encs, w, dev, iters=iters, log=err.print)
    df = pd.DataFrame(rows).convert_dtypes()  # decoder and encoder rows merged: keep ints ints
    if output:
        from benchmark.fsutil import atomic_write_text

        atomic_write_text(output, df.to_csv(index=False))
        err.print(f"wrote {output}")
    if format == "json":
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
    elif format == "csv":
        sys.stdout.write(df.to_csv(index=False))
    else:
        show = table_columns(df.columns)
        table = Table(title=f"capbench bench on {dev} (median of {iters}; workload: {w})")
        for c in show:
            table.add_column(c, justify="right")
        for _, r in df[show].iterrows():
            table.add_row(*("-" if pd.isna(v) else f"{v:,.1f}" if isinstance(v, float) else str(v)
                            for v in r))
        console.print(table)


@app.command("list")
@_guard
def list_models(
    pattern: Annotated[str, typer.Argument(help="shell wildcard on names, e.g. '*vit*'")] = "*",
):
    """List registered encoders and decoders with feature shapes and parameter counts."""
    from architectures.factory import describe_decoders, describe_encoders

    enc_table = Table(title="encoders (random init to count parameters; nothing is downloaded)")
    for c in ("name", "aliases", "grid (N x D)", "pooled", "params", "description"):
        enc_table.add_column(c)
    for r in describe_encoders(pattern):
        enc_table.add_row(r["name"], r["aliases"], r["grid"], str(r["pooled"]),
                          f"{r['params'] / 1e6:.1f}M", r["description"])
    console.print(enc_table)
    dec_table = Table(title="decoders (params for a 2048-d 7x7 grid and a 10k vocabulary)")
    for c in ("name", "aliases", "params", "description"):
        dec_table.add_column(c)
    for r in describe_decoders(pattern):
        dec_table.add_row(r["name"], r["aliases"], f"{r['params'] / 1e6:.1f}M", r["description"])
    console.print(dec_table)


@app.command()
@_guard
def baseline(
    dataset: Annotated[str, typer.Option(help="'shapes' or a Karpathy dataset.json")] = "shapes",
    split: Annotated[str, typer.Option(help="split to score")] = "test",
    kind: Annotated[str, typer.Option(help="most-frequent, consensus, nn, or all (comma-separated)")] = "all",
    encoder: Annotated[str, typer.Option(help="encoder whose pooled features the nn baseline uses")] = "resnet50",
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="pretrained encoder weights (nn) or a seeded random init")] = True,
    k: Annotated[int, typer.Option(help="nearest training images the nn baseline pools captions from")] = 5,
):
    """Score the baselines that never look at a model: blind (one caption for every image:
    the most frequent training caption, or the best constant caption by CIDEr-D) and nearest
    neighbour (the consensus caption of the k nearest training images, Devlin et al. 2015)."""
    from benchmark.config import load_config
    from benchmark.runner import run_baselines

    kinds = ["most-frequent", "consensus", "nn"] if kind == "all" else [x.strip() for x in kind.split(",")]
    cfg = load_config(None, {"encoder": encoder, "pretrained": pretrained, "dataset": dataset})
    ds, encoder, scores = run_baselines(cfg, kinds, split=split, k=k, console=console)
    table = Table(title=f"baselines on {ds.name} {split} ({len(ds.split(split))} images)")
    for c in ("baseline", "caption", "B@4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE"):
        table.add_column(c, justify="left" if c in ("baseline", "caption") else "right")
    for name, b in scores.items():
        m = b["metrics"]
        label = f"nn ({encoder}, k={k})" if name == "nn" else f"blind: {name}"
        table.add_row(label, b["caption"] or b["detail"],
                      *("n/a" if m.get(x) is None else f"{100 * m[x]:.1f}"
                        for x in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")))
    console.print(table)
    for name, b in scores.items():
        console.print(f"{name}: {b['detail']}", highlight=False)


@data_app.command("shapes")
@_guard
def data_shapes(
    out: Annotated[Path, typer.Option(help="output folder (dataset.json + images/)")],
    n_images: Annotated[int, typer.Option(help="number of images")] = 600,
    seed: Annotated[int, typer.Option(help="generator seed")] = 0,
    force: Annotated[bool, typer.Option(help="overwrite an existing dataset.json in --out")] = False,
):
    """Generate the embedded 'shapes' dataset in Karpathy format."""
    from benchmark.shapes import generate_shapes

    if n_images < 10:
        _fail("--n-images must be at least 10")
    path = generate_shapes(out, n_images, seed, overwrite=force)
    console.print(f"wrote {path} ({n_images} images)")


def main() -> None:  # pragma: no cover
    app()
