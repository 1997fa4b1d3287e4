"""``capbench``: the command-line interface (Typer + rich)."""

from __future__ import annotations

import copy
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, get_args

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from benchmark.errors import CapbenchError, ConfigError, user_message

QUICKSTART = """Quickstart:
  capbench run --config demo          train and score the demo model on the embedded `shapes` set
  capbench report                     the leaderboard of every run in results/
  capbench eval PREDS.json --references coco-val2014   score captions made by any codebase"""

#: the help's command panels, in the order --help shows them
PANELS = ("Train & compare", "Inspect a model", "Score", "Data", "Measure", "Diagnose")


class _PanelOrder(typer.core.TyperGroup):
    """The top-level commands listed panel by panel (in :data:`PANELS` order), each panel's
    commands in the order they were defined."""

    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        panel = {n: PANELS.index(p) if (p := getattr(self.commands[n], "rich_help_panel", None)) in PANELS
                 else len(PANELS) for n in names}
        return sorted(names, key=lambda n: panel[n])  # stable: definition order within a panel


# rich_markup_mode="markdown": a docstring's hard-wrapped lines are shown as flowing paragraphs
app = typer.Typer(cls=_PanelOrder, no_args_is_help=False, pretty_exceptions_enable=False, rich_markup_mode="markdown",
                  help="Benchmark image-captioning encoders x decoders on one harness.",
                  epilog="Example: `capbench run --config demo`, then `capbench report`. The docs: `make docs`, then `python3 -m http.server -d site`.")
data_app = typer.Typer(no_args_is_help=True, rich_markup_mode="markdown", help="Write datasets to disk: the embedded shapes set, or a Karpathy dataset.json from downloaded Flickr8k/Flickr30k/COCO captions.",
                       epilog="Example: `capbench data shapes --out data/shapes`")
app.add_typer(data_app, name="data", rich_help_panel="Data")
console = Console(width=None if sys.stdout.isatty() else 160)
#: the model-based metrics' weight files (CLIP-S, PAC-S), shared by run and eval
_ClipWeights = Annotated[Path | None, typer.Option(help="OpenAI CLIP ViT-B/32 weights for CLIP-S/RefCLIP-S (ViT-B-32.pt or a state dict; default: open_clip's pretrained='openai' from its cache or the internet; or $CAPBENCH_CLIP_WEIGHTS)")]
_PacsWeights = Annotated[Path | None, typer.Option(help="PAC-S checkpoint for PAC-S/RefPAC-S (aimagelab/pacscore's clip_ViT-B-32.pth; or $CAPBENCH_PACS_WEIGHTS)")]
_BertscoreModel = Annotated[str | None, typer.Option(help="also score BERTScore (pip install bert-score) with this model: hub name or folder, e.g. roberta-large; or $CAPBENCH_BERTSCORE_MODEL")]
err = Console(stderr=True, soft_wrap=True)


class ReportFormat(str, Enum):
    """``report --format``."""

    table = "table"
    markdown = "markdown"
    csv = "csv"
    json = "json"


class BenchFormat(str, Enum):
    """``bench --format``."""

    table = "table"
    csv = "csv"
    json = "json"


class Launcher(str, Enum):
    """``matrix --launcher``."""

    local = "local"
    slurm = "slurm"


class TableOrJson(str, Enum):
    """``--format`` of eval, caption, ground and the one-line bench commands."""

    table = "table"
    json = "json"


def _fail(message: str, code: int = 2):
    err.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False)  # may quote user text
    raise typer.Exit(code)


def _q(text) -> str:
    """``text`` (a path, name or message that may hold ``[``) safe inside rich markup."""
    return escape(str(text))


def _show_warning(message, category, filename, lineno, file=None, line=None):
    err.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False)


def _print_version(value: bool) -> None:
    """``--version``: capbench's, torch's and the device's versions, then exit."""
    if value:
        from benchmark.doctor import version_text

        console.print(version_text(), highlight=False)
        raise typer.Exit(0)


@app.callback(invoke_without_command=True)
def _main(ctx: typer.Context,
          version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version, help="show capbench's, torch's and the device's versions and exit")] = False):
    """Benchmark image-captioning encoders x decoders on one harness."""
    import tempfile
    import warnings

    from benchmark.errors import CapbenchWarning
    from benchmark.fsutil import remove_stale_temps

    warnings.showwarning = _show_warning
    warnings.simplefilter("always", CapbenchWarning)
    remove_stale_temps(tempfile.gettempdir(), own_folder=False)  # killed capbench scratch folders
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
            _fail(user_message(exc))  # raised in a DataLoader worker: its message, not torch's traceback
        except OSError as exc:  # a file or folder the user named: unreadable, read-only, full
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(f"{where}{exc.strerror or exc}")
        except KeyboardInterrupt:
            _fail("interrupted; records already written are kept", 130)

    return wrapper


@app.command(rich_help_panel="Train & compare", epilog="Example: `capbench run --config demo --arch transformer`")
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
    patience: Annotated[int | None, typer.Option(help="early stopping: validations without a new best validation CIDEr-D (0 = off)")] = None,
    scst_epochs: Annotated[int | None, typer.Option(help="self-critical sequence training epochs after the cross-entropy ones (0 = off)")] = None,
    finetune_encoder: Annotated[str | None, typer.Option(help="fine-tune the encoder: none, last (its last stage) or all; images are read past the feature cache")] = None,
    encoder_lr: Annotated[float | None, typer.Option(help="learning rate of the fine-tuned encoder part")] = None,
    grad_checkpointing: Annotated[bool | None, typer.Option("--grad-checkpointing/--no-grad-checkpointing", help="fine-tuning: recompute the encoder's activations in the backward pass (less memory, more time; ViT and CLIP)")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="caption tokenizer: word, bpe (byte-level, GPT-2 style), wordpiece (BERT style), or a saved Hugging Face tokenizer folder/name")] = None,
    log: Annotated[str | None, typer.Option("--log", help="also log each epoch to tensorboard (`RESULTS_DIR/tensorboard/`) or wandb (offline without a key), or none")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the newest unfinished run of the same config and seed from its last completed epoch")] = False,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="run the training steps through torch.compile (capbench bench decoders --compile measures the speedup)")] = None,
    nproc: Annotated[int, typer.Option(help="processes on this machine (e.g. one per GPU): launches torchrun with DistributedDataParallel; --batch-size stays the global batch")] = 1,
    clip_weights: _ClipWeights = None,
    pacs_weights: _PacsWeights = None,
    bertscore_model: _BertscoreModel = None,
):
    """Train a decoder, score it on the test split and write a run record.

    The decoder reads frozen encoder features from the feature cache, or fine-tunes the encoder
    (--finetune-encoder)."""
    from benchmark import distributed
    from benchmark.config import load_config, parse_seeds
    from benchmark.metrics import use_weight_files
    from benchmark.runner import launch_ranks, run_seeds

    distributed.check_nproc(nproc)
    use_weight_files(bertscore_model, clip_weights=clip_weights, pacs_weights=pacs_weights)

    cfg = load_config(config, {
        "decoder": arch, "encoder": encoder, "dataset": dataset, "train.epochs": epochs,
        "train.batch_size": batch_size, "seed": seed, "decode.beam_size": beam_size,
        "device": device, "pretrained": pretrained, "weights": str(weights) if weights else None,
        "results_dir": str(results_dir) if results_dir else None, "train.patience": patience,
        "train.scst_epochs": scst_epochs, "tokenizer": tokenizer,
        "encoder_trainable": finetune_encoder, "encoder_lr": encoder_lr, "log": log,
        "train.compile": compile, "encoder_grad_checkpointing": grad_checkpointing,
    })
    seed_list = parse_seeds(seeds) if seeds else [cfg.seed]
    code = launch_ranks(cfg, nproc, sys.argv[1:], lambda text: err.print(_q(text), highlight=False))
    if code is not None:
        raise typer.Exit(code)
    is_rank0 = distributed.launched_as_main()

    def on_start(s: int) -> None:
        if is_rank0:
            console.rule(f"capbench run: {cfg.decoder} on {cfg.encoder} ({cfg.dataset}), seed {s}")

    try:
        for record, path in run_seeds(cfg, seed_list, console if is_rank0 else None, on_start,
                                      resume=resume):
            if record is not None:
                _print_run_summary(record, path)
    finally:
        distributed.shutdown()


def _print_run_summary(record, path: Path) -> None:
    from benchmark.report import leaderboard, render_rich

    render_rich(leaderboard([record]), console)
    for m, why in record.metrics_unavailable.items():
        console.print(f"[yellow]{m} unavailable:[/] {_q(why)}", highlight=False)
    tp = record.throughput
    console.print(f"train {tp['train_tokens_per_s']:.0f} tokens/s, inference "
                  f"{tp['inference_images_per_s']:.1f} images/s (from pixels), decoder "
                  f"{tp['decoder_captions_per_s']:.0f} captions/s; wall "
                  f"{record.wall_seconds:.0f} s")
    console.print(f"run record: {_q(path)}")


@app.command(rich_help_panel="Train & compare", epilog="Example: `capbench report --wide --plot plots/`")
@_guard
def report(
    results_dir: Annotated[list[Path] | None, typer.Option(help="folder holding runs/*.json (default results/); repeat it to merge several into one board, e.g. the folders of `matrix --shard` machines")] = None,
    format: Annotated[ReportFormat, typer.Option("--format", help="table, markdown, csv or json")] = ReportFormat.table,
    output: Annotated[Path | None, typer.Option(help="write to this file instead of the terminal")] = None,
    aggregate: Annotated[bool, typer.Option(help="fold runs that differ only in seed into mean ± std rows")] = False,
    plot: Annotated[Path | None, typer.Option(help="write PNG plots here (quality vs throughput with Pareto front, per-metric bars, training curves of loss and validation CIDEr-D per epoch)")] = None,
    leaderboard_file: Annotated[bool, typer.Option("--leaderboard-file/--no-leaderboard-file", help="also write `RESULTS_DIR/LEADERBOARD.md` (the first --results-dir when several)")] = True,
    columns: Annotated[str | None, typer.Option(help="table columns, comma-separated, e.g. B@1,B@4,CIDEr-D,img/s (display names or keys such as Bleu_4, CIDEr, train_tokens_per_s; any case); run, decoder, encoder and CIDEr-D are always shown")] = None,
    wide: Annotated[bool, typer.Option("--wide", help="table: every column (any that do not fit the terminal are named under the table)")] = False,
    gallery: Annotated[Path | None, typer.Option(help="also write a static HTML gallery here: per dataset/split, each test image's thumbnail, references and every model's caption with its per-image CIDEr-D, worst first")] = None,
    gallery_images: Annotated[int | None, typer.Option(min=1, help="gallery: show only the N worst images of each group")] = None,
    gallery_strips: Annotated[bool, typer.Option("--gallery-strips/--no-gallery-strips", help="gallery: draw each attention decoder's per-word attention under its caption (loads the checkpoints)")] = True,
    raw_p: Annotated[bool, typer.Option("--raw-p", help="show the raw `vs blind` p-values (raw p) beside the Holm-adjusted ones")] = False,
):
    """Show every run as a leaderboard grouped by dataset and split fingerprint.

    Also writes `RESULTS_DIR/LEADERBOARD.md` (markdown) unless --no-leaderboard-file.

    Several --results-dir (e.g. the folders of `matrix --shard` machines) form one board: a
    record found in two folders counts once, LEADERBOARD.md goes into the first folder."""
    from benchmark.report import ReportOptions, make_report, render_rich

    cols = [c for c in columns.split(",") if c.strip()] if columns is not None else None
    outcome = make_report(ReportOptions(
        results_dir or [], format.value, output, aggregate, plot, leaderboard_file, cols, gallery,
        gallery_images, gallery_strips, raw_p), _report_note)
    if outcome.text is None:
        if not outcome.board.empty or outcome.board.attrs.get("tuning_trials"):
            render_rich(outcome.board, console, columns=cols, wide=wide, raw_p=raw_p)
    elif output:
        console.print(f"wrote {_q(output)} ({len(outcome.board)} runs)")
    else:
        sys.stdout.write(outcome.text)


_REPORT_NOTES = {  # report.make_report's notes as printed: (rich text, highlight)
    "skipped": lambda f: (f"[yellow]skipped:[/] {_q(f['problem'])}", False),
    "wrote": lambda f: (f"wrote {_q(f['path'])}", True),
    "leaderboard_unwritten": lambda f: (f"[yellow]warning:[/] could not write {_q(f['path'])} "
                                       f"({f['why']}); pass --no-leaderboard-file to skip it", False),
    "gallery": lambda f: (f"wrote {f['pages']} gallery page(s) and {_q(f['index'])}", True),
    "strips": lambda f: (f"{f['count']} attention strip(s) in {f['seconds']:.1f} s", False),
    "no_strips": lambda f: (f"[yellow]no attention strips for {_q(f['run_id'])}:[/] {_q(f['why'])}", False),
    "no_gallery": lambda f: (f"[yellow]no run records in {_q(f['where'])}: no gallery written[/]", False),
    "no_runs": lambda f: (f"no {'readable ' if f['readable'] else ''}runs found in {_q(f['where'])}", False),
    "crossings": lambda f: (_crossings_text(f["rows"], f["n_curves"]), False),
}


def _crossings_text(rows: list[dict], n_curves: int) -> str:
    """The EVP crossing table (benchmark.evp.crossings) as lines for the terminal."""
    head = (f"expected validation performance of {n_curves} architecture(s) (tuning trials): ")
    if not rows:
        return head + "no two curves change order at any budget"
    lines = [head + "the ranking changes at budget k ="]
    lines += [f"  k={r['k']} {_q(r['dataset'])} ({r['split']}): {_q(r['above'])} "
              f"({100 * r['above_value']:.1f}) overtakes {_q(r['below'])} "
              f"({100 * r['below_value']:.1f})" for r in rows]
    return "\n".join(lines)


def _report_note(kind: str, **fields) -> None:
    text, highlight = _REPORT_NOTES[kind](fields)
    err.print(text, highlight=highlight)


@app.command("eval", rich_help_panel="Score", epilog="Example: `capbench eval preds.json --references coco-val2014`")
@_guard
def evaluate(
    predictions: Annotated[Path | None, typer.Argument(help="COCO results JSON: [{image_id, caption}, ...] (or use --run and --dataset)")] = None,
    references: Annotated[str | None, typer.Option(help="Karpathy dataset.json, COCO captions JSON, or coco-val2014 / coco-train2014 (offline copy in pycocoevalcap)")] = None,
    split: Annotated[str, typer.Option(help="split of a Karpathy references file / of --dataset")] = "test",
    format: Annotated[TableOrJson, typer.Option("--format", help="table or json")] = TableOrJson.table,
    run: Annotated[str | None, typer.Option("--run", help="score this saved run instead: run id (or unique prefix/suffix), checkpoint folder, or 'latest'")] = None,
    dataset: Annotated[str | None, typer.Option(help="with --run: 'shapes', 'shapes:N' or a Karpathy dataset.json to caption and score")] = None,
    results_dir: Annotated[Path, typer.Option(help="with --run: folder holding runs/ and checkpoints/; the new record goes to its runs/")] = Path("results"),
    beam_size: Annotated[int | None, typer.Option(help="with --run: override the run's beam size")] = None,
    max_len: Annotated[int | None, typer.Option(help="with --run: override the run's maximum caption length")] = None,
    encoder_weights: Annotated[Path | None, typer.Option(help="with --run: the encoder weights file, if it moved since training")] = None,
    hf: Annotated[str | None, typer.Option("--hf", help="score a pretrained Hugging Face captioner on --dataset as a reference row: hub id (e.g. Salesforce/blip-image-captioning-base; from the cache or the internet) or a save_pretrained folder; --beam-size/--max-len/--min-len/--prompt override the family's defaults (BLIP: beam 3, length 5-20; BLIP-2: beam 5, 8-30; others: the model's generation_config)")] = None,
    min_len: Annotated[int | None, typer.Option(help="with --hf: minimum caption length in tokens (BLIP/BLIP-2: generate's min_length, as LAVIS; others: new tokens)")] = None,
    prompt: Annotated[str | None, typer.Option(help="with --hf: the text prompt (default: the family's, e.g. BLIP 'a picture of '; '' for none)")] = None,
    batch_size: Annotated[int, typer.Option(help="with --hf: images per generate call", min=1)] = 16,
    device: Annotated[str, typer.Option(help="with --hf: auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")] = "auto",
    images: Annotated[Path | None, typer.Option(help="folder of the images, found by the file names the references give (CLIP-S needs the images; a Karpathy file's own paths are used without it)")] = None,
    clip_weights: _ClipWeights = None,
    pacs_weights: _PacsWeights = None,
    bertscore_model: _BertscoreModel = None,
):
    """Score captions made elsewhere, a saved run on another dataset, or a pretrained captioner.

    A COCO-format predictions file is scored exactly as the COCO caption toolkit does (and with
    CLIP-S/RefCLIP-S where the images and CLIP weights are at hand). With --run and --dataset, a
    saved model captions another dataset (or split) and is scored on it (cross-dataset
    transfer), writing a new run record. With --hf and --dataset, a pretrained Hugging Face
    captioner (BLIP, BLIP-2, GIT, ...) does the same, as a reference row on the board."""
    import json

    from benchmark.metrics import use_weight_files
    from benchmark.references import eval_form, evaluate_file

    form = eval_form(predictions, references, run, dataset, hf)
    use_weight_files(bertscore_model, clip_weights=clip_weights, pacs_weights=pacs_weights)
    if form == "hf":
        from benchmark.hf_captioners import HFEvalOptions

        _evaluate_hf(hf, dataset, split, format, HFEvalOptions(
            beam_size, max_len, min_len, prompt, batch_size, device, results_dir))
        return
    if form == "run":
        _evaluate_run(run, dataset, split, format, results_dir, beam_size, max_len, encoder_weights)
        return
    ev = evaluate_file(predictions, references, split, images_dir=images)
    if format == "json":
        sys.stdout.write(json.dumps(ev.to_json(), indent=1) + "\n")
        return
    console.print(_metric_table(f"{_q(predictions.name)}: {ev.images} captions vs {_q(references)}",
                                ev.result.metrics, ev.confidence_intervals))
    if ev.missing_references:
        console.print(f"[bold yellow]warning:[/] {ev.missing_references} of "
                      f"{ev.images + ev.missing_references} reference images have no prediction; "
                      f"the scores cover only the {ev.images} predicted images", highlight=False)
    _print_unavailable(ev.result.unavailable)
    console.print(f"scored in {ev.seconds:.1f} s")


def _print_unavailable(unavailable: dict) -> None:
    """One line per reason, naming the metrics it stops (CLIP-S and RefCLIP-S share theirs)."""
    by_reason: dict[str, list[str]] = {}
    for m, why in unavailable.items():
        by_reason.setdefault(why, []).append(m)
    for why, names in by_reason.items():
        console.print(f"[yellow]{', '.join(names)} unavailable:[/] {_q(why)}", highlight=False)


def _metric_table(title: str, metrics: dict, intervals: dict) -> Table:
    """A metric, score, 95% CI table (eval of a file and of a saved run)."""
    table = Table(title=title)
    for c in ("metric", "score", "95% CI"):
        table.add_column(c, justify="right")
    for m, v in metrics.items():
        lo_hi = intervals.get(m)
        table.add_row(m, "unavailable" if v is None else f"{v:.3f}",
                      f"[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else "-")
    return table


def _evaluate_hf(model: str, dataset: str, split: str, format, options) -> None:
    """``eval --hf MODEL --dataset D``: a pretrained captioner's reference record, shown."""
    import json

    from benchmark.hf_captioners import evaluate_hf

    _, record, path = evaluate_hf(model, dataset, split, options)
    ref = record.reference_model
    if format == "json":
        sys.stdout.write(json.dumps({"run_id": record.run_id, "reference_model": ref,
                                     "dataset": record.dataset.name, "split": split,
                                     "images": len(record.predictions), "metrics": record.metrics,
                                     "confidence_intervals": record.confidence_intervals,
                                     "unavailable": record.metrics_unavailable,
                                     "images_per_s": record.throughput["inference_images_per_s"],
                                     "record": str(path)}, indent=1) + "\n")
        return
    console.print(_metric_table(f"{_q(ref['family'])} (pretrained) {_q(model)} on "
                                f"{_q(record.dataset.name)} {split} ({len(record.predictions)} images)",
                                record.metrics, record.confidence_intervals))
    _print_unavailable(record.metrics_unavailable)
    console.print(f"decoding: {_q(ref['decoding']['generate_kwargs'])}, prompt "
                  f"{_q(repr(ref['decoding']['prompt']))} ({_q(ref['decoding']['source'])}); "
                  f"{record.throughput['inference_images_per_s']:.1f} images/s from pixels "
                  f"({ref['dtype']}, {record.environment.get('device')})", highlight=False)
    console.print(f"[yellow]reference row:[/] {_q(ref['note'])}", highlight=False)
    console.print(f"run record: {_q(path)} (wall {record.wall_seconds:.0f} s)")


def _evaluate_run(run, dataset, split, format, results_dir, beam_size, max_len, encoder_weights):
    """``eval --run RUN --dataset D``: caption D's split with the saved model, score, record."""
    import json

    from benchmark.captioner import evaluate_saved_run

    loaded, record, path = evaluate_saved_run(run, dataset, split, results_dir, beam_size=beam_size,
                                              max_len=max_len, encoder_weights=encoder_weights,
                                              console=console)
    if format == "json":
        sys.stdout.write(json.dumps({"run_id": record.run_id, "evaluation": record.evaluation,
                                     "dataset": record.dataset.name, "split": split,
                                     "images": len(record.predictions), "metrics": record.metrics,
                                     "confidence_intervals": record.confidence_intervals,
                                     "unavailable": record.metrics_unavailable,
                                     "record": str(path)}, indent=1) + "\n")
        return
    console.print(_metric_table(f"run {_q(loaded.run_id)} on {_q(record.dataset.name)} {split} "
                                f"({len(record.predictions)} images, beam {loaded.decode.beam_size})",
                                record.metrics, record.confidence_intervals))
    _print_unavailable(record.metrics_unavailable)
    console.print(f"run record: {_q(path)} (eval of {_q(loaded.run_id)}; wall {record.wall_seconds:.0f} s)")


@app.command(rich_help_panel="Inspect a model", epilog="Example: `capbench caption photo.jpg more/ --run latest`")
@_guard
def caption(
    paths: Annotated[list[str], typer.Argument(help="image files, folders (their images, sorted) or glob patterns")],
    run: Annotated[str, typer.Option("--run", help="run id (or unique prefix/suffix), checkpoint folder, or 'latest'")],
    results_dir: Annotated[Path, typer.Option(help="folder holding runs/ and checkpoints/")] = Path("results"),
    beam_size: Annotated[int | None, typer.Option(help="override the run's beam size (1 = greedy)")] = None,
    max_len: Annotated[int | None, typer.Option(help="override the run's maximum caption length")] = None,
    format: Annotated[TableOrJson, typer.Option("--format", help="table, or json (COCO results: [{image_id, file_name, caption}])")] = TableOrJson.table,
    encoder_weights: Annotated[Path | None, typer.Option(help="the encoder weights file, if it moved since training")] = None,
):
    """Caption images with a saved run.

    Unreadable files are reported and skipped (exit status 1)."""
    import json
    import time

    from benchmark.captioner import caption_saved_run, coco_results

    t0 = time.perf_counter()
    loaded, res = caption_saved_run(paths, run, results_dir, beam_size=beam_size, max_len=max_len,
                                    encoder_weights=encoder_weights)
    failures = res.failures
    if format == "json":
        rows, twice = coco_results(res.captions)
        if twice:
            err.print(f"[bold yellow]warning:[/] files with the same name give the same image_id "
                      f"({', '.join(twice[:5])}); COCO tools would keep only one of each", highlight=False)
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
    else:
        table = Table(title=f"run {_q(loaded.run_id)} ({loaded.arch} on {loaded.encoder.name}, beam "
                      f"{loaded.decode.beam_size})")
        table.add_column("file")
        table.add_column("caption")
        for p, c in res.captions:
            table.add_row(_q(p), _q(c))
        console.print(table)
    for p, why in failures:
        err.print(f"[bold red]failed:[/] {_q(p)}: {_q(why)}", highlight=False)
    total = time.perf_counter() - t0
    err.print(f"captioned {len(res.captions)} image(s) in {res.seconds:.2f} s "
              f"({res.images_per_s:.1f} images/s once loaded; model load {loaded.load_seconds:.2f} s, "
              f"total {total:.2f} s){f'; {len(failures)} failed' if failures else ''}",
              highlight=False)
    if failures:
        raise typer.Exit(1)


@app.command(rich_help_panel="Inspect a model", epilog="Example: `capbench explain photo.jpg --run latest --method gradcam --out figs/`")
@_guard
def explain(
    image: Annotated[Path, typer.Argument(help="image file")],
    run: Annotated[str, typer.Option("--run", help="run id (or unique prefix/suffix), checkpoint folder, or 'latest'")],
    method: Annotated[str, typer.Option(help="attention (attn_lstm, transformer) or gradcam (any decoder)")] = "attention",
    out: Annotated[Path, typer.Option(help="folder for the PNG")] = Path("explain"),
    layer: Annotated[int, typer.Option(help="transformer: cross-attention layer to show (-1 = last)")] = -1,
    results_dir: Annotated[Path, typer.Option(help="folder holding runs/ and checkpoints/")] = Path("results"),
    beam_size: Annotated[int | None, typer.Option(help="override the run's beam size")] = None,
    max_len: Annotated[int | None, typer.Option(help="override the run's maximum caption length")] = None,
    encoder_weights: Annotated[Path | None, typer.Option(help="the encoder weights file, if it moved since training")] = None,
):
    """Caption IMAGE and write one PNG with a heatmap panel per generated word.

    The maps are the decoder's soft attention (Xu et al. 2015) or cross-attention, or Grad-CAM
    (Selvaraju et al. 2017)."""
    from benchmark.explain import explain_saved_run

    done = explain_saved_run(image, run, results_dir, method, out=out, layer=layer,
                             beam_size=beam_size, max_len=max_len, encoder_weights=encoder_weights)
    ex = done.explanation
    console.print(f"caption: {_q(ex.caption)}", highlight=False)
    console.print(f"wrote {_q(done.path)} ({len(ex.words)} word panels; {method} {ex.seconds[method]:.2f} s, "
                  f"total {done.seconds:.2f} s after loading the model)", highlight=False)


@app.command(rich_help_panel="Inspect a model", epilog="Example: `capbench ground --run latest`")
@_guard
def ground(
    run: Annotated[str, typer.Option("--run", help="run id (or unique prefix/suffix), checkpoint folder, or 'latest'")],
    results_dir: Annotated[Path, typer.Option(help="folder holding runs/ and checkpoints/")] = Path("results"),
    split: Annotated[str, typer.Option(help="split of the shapes dataset")] = "test",
    dataset: Annotated[str | None, typer.Option(help="shapes dataset.json with object boxes (default: the run's dataset)")] = None,
    tolerance: Annotated[float, typer.Option(help="pointing-game tolerance in image pixels (Zhang et al. 2016: 15)")] = 15.0,
    layer: Annotated[int, typer.Option(help="transformer: cross-attention layer (-1 = last)")] = -1,
    seed: Annotated[int, typer.Option(help="seed of the random-point baseline")] = 0,
    format: Annotated[TableOrJson, typer.Option("--format", help="table or json")] = TableOrJson.table,
    details: Annotated[bool, typer.Option(help="json: also list every scored word")] = False,
    save: Annotated[bool, typer.Option("--save/--no-save", help="write the figures into the run's record (its `grounding` field, shown on the leaderboard)")] = True,
):
    """Score whether the maps of words naming a shape or colour point at that object (shapes).

    The pointing game and the energy in the box, for attention, Grad-CAM, and the centre and
    random baselines. The figures go into the run's record unless --no-save."""
    import json

    from benchmark.grounding import ground_saved_run

    loaded, res, saved = ground_saved_run(run, results_dir, split, dataset, tolerance=tolerance,
                                          seed=seed, layer=layer, save=save)
    if format == "json":
        sys.stdout.write(json.dumps(res.to_json(details), indent=1) + "\n")
        return
    table = Table(title=f"grounding of {_q(loaded.run_id)} on {split} ({res.images} images, "
                  f"{res.words} colour/shape words; tolerance {tolerance:g} px)")
    for c in ("method", "pointing game", "energy in box", "colour words", "shape words"):
        table.add_column(c, justify="left" if c == "method" else "right")
    for name, *values in res.table_rows():
        table.add_row(name, *("n/a" if v is None else f"{100 * v:.1f}%" for v in values))
    console.print(table)
    for m, why in res.methods_unavailable.items():
        console.print(f"[yellow]{m} unavailable:[/] {_q(why)}", highlight=False)
    console.print(f"{res.unmatched_words} colour/shape word(s) named nothing in their image (not "
                  f"scored); {res.seconds:.0f} s", highlight=False)
    if saved:
        console.print(f"saved to the run record {_q(saved)} (field `grounding`)", highlight=False)
    elif save:
        console.print("[yellow]not saved:[/] this checkpoint has no run record", highlight=False)


@app.command(rich_help_panel="Train & compare", epilog="Example: `capbench compare RUN_A RUN_B`")
@_guard
def compare(
    runs: Annotated[list[str], typer.Argument(help="two runs or more, each a run id (or unique prefix/suffix) or record path; the first is A, each other one is tested against it")],
    results_dir: Annotated[Path, typer.Option(help="folder holding runs/*.json")] = Path("results"),
    resamples: Annotated[int, typer.Option(help="bootstrap resamples")] = 2000,
    raw_p: Annotated[bool, typer.Option("--raw-p", help="with three runs or more: show the raw p-values beside the Holm-adjusted ones")] = False,
):
    """Paired bootstrap test of run B (and C, D, ...) against run A on the same test images.

    With three runs or more, each metric's p-values are Holm-adjusted over the comparisons
    (each run against A); --raw-p shows the raw ones beside them."""
    from benchmark.records import find_record
    from benchmark.stats import check_resamples, compare_to_first

    check_resamples(resamples)
    if len(runs) < 2:
        raise ConfigError("compare needs two runs or more: capbench compare RUN_A RUN_B [RUN_C ...]")
    records = [find_record(r, results_dir) for r in runs]
    results = compare_to_first(records, n_resamples=resamples)
    a, many = records[0], len(records) > 2
    for i, (b, result) in enumerate(zip(records[1:], results, strict=True), start=1):
        _compare_table(a, b, result, chr(65 + i) if i < 26 else f"R{i + 1}", resamples,
                       raw_p and many)
    if many:
        console.print(f"p: Holm-adjusted per metric over {len(results)} tests (each run against "
                      "A; statsmodels multipletests)" + ("; raw p: unadjusted" if raw_p else
                                                         "; --raw-p shows the raw p-values")
                      + "; the 95% CIs are not adjusted", highlight=False)


def _compare_table(a, b, result: dict, name: str, resamples: int, raw_p: bool) -> None:
    """Print one `compare` table: run ``b`` (called ``name``) against run ``a``."""
    from benchmark.report import METRIC_COLUMNS

    table = Table(title=f"{name} - A, paired bootstrap over {len(a.per_image['image_ids'])} "
                  f"images ({resamples} resamples)", caption=f"A = {a.run_id}\n{name} = {b.run_id}")
    for c in ("metric", "A", name, f"{name} - A", "95% CI", "p", *(["raw p"] if raw_p else [])):
        table.add_column(c, justify="right")
    for m in (m for m in METRIC_COLUMNS if m in result):
        r = result[m]
        table.add_row(m, f"{100 * a.metrics[m]:.1f}", f"{100 * b.metrics[m]:.1f}",
                      f"{100 * r['delta']:+.1f}", f"[{100 * r['ci'][0]:+.1f}, {100 * r['ci'][1]:+.1f}]",
                      f"{r['p']:.3f}", *([f"{r['p_raw']:.3f}"] if raw_p else []))
    console.print(table)
    if "METEOR_image_mean" in result:
        r = result["METEOR_image_mean"]
        console.print(f"[yellow]METEOR:[/] a record predates per-image METEOR statistics; mean of "
                      f"per-image METEOR {name} - A {100 * r['delta']:+.1f} [{100 * r['ci'][0]:+.1f}, "
                      f"{100 * r['ci'][1]:+.1f}], p {r['p']:.3f} (not the corpus METEOR)", highlight=False)


@app.command(rich_help_panel="Diagnose", epilog="Example: `capbench doctor`")
@_guard
def doctor():
    """Show what works on this machine: versions, devices, Java metrics, caches, local weights."""
    from benchmark.doctor import doctor_rows

    t = Table(title="capbench doctor", show_header=False)
    t.add_column("item")
    t.add_column("status")
    for item, status in doctor_rows():
        t.add_row(item, status)
    console.print(t)


@app.command(rich_help_panel="Train & compare", epilog="Example: `capbench matrix --config matrix-shapes --no-pretrained --shard 1/4`")
@_guard
def matrix(
    archs: Annotated[str | None, typer.Option(help="decoders, comma-separated (default: the config's matrix or all registered)")] = None,
    encoders: Annotated[str | None, typer.Option(help="encoders, comma-separated (default: the config's matrix or the full-size ones)")] = None,
    config: Annotated[str | None, typer.Option(help="preset or YAML; its optional `matrix:` section gives archs/encoders/seeds/variants")] = None,
    seeds: Annotated[str | None, typer.Option(help="seeds, e.g. 0,1,2")] = None,
    dataset: Annotated[str | None, typer.Option(help="'shapes' or a Karpathy dataset.json")] = None,
    epochs: Annotated[int | None, typer.Option(help="training epochs per cell")] = None,
    pretrained: Annotated[bool | None, typer.Option("--pretrained/--no-pretrained", help="pretrained encoder weights or a seeded random init")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, mps")] = None,
    results_dir: Annotated[Path | None, typer.Option(help="where run records go")] = None,
    shard: Annotated[str | None, typer.Option(help="i/N: run only shard i (1..N) of the matrix split across N machines; each (encoder, decoder, variant) goes whole, with all its seeds, to one shard, the same one on every machine; merge the folders with `capbench report --results-dir A --results-dir B ...`")] = None,
    launcher: Annotated[Launcher | None, typer.Option(help="slurm: one job-array task per pending cell through submitit (requeued on preemption/timeout, resumed from the last epoch); local: the same tasks as local processes, --parallel at a time (docs/cluster.md)")] = None,
    parallel: Annotated[int, typer.Option(min=1, help="--launcher local: cells running at once (1: the plain loop)")] = 1,
    slurm: Annotated[list[str] | None, typer.Option(help="a Slurm setting KEY=VALUE (partition, gpus_per_task, cpus_per_task, mem_gb, time_min, array_parallelism, sbatch.OPTION); repeat it; over the config's launcher: section")] = None,
    status: Annotated[bool, typer.Option("--status", help="say for every cell: done, running, queued, failed (with the end of its log) or not started")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="with --launcher: resubmit the failed cells alone")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="--launcher slurm: wait for the array to end, then show the board")] = False,
    board_job: Annotated[bool, typer.Option("--board-job", help="--launcher slurm: also submit a job that writes LEADERBOARD.md once the array has ended")] = False,
    list_cells: Annotated[bool, typer.Option("--list-cells", help="print the plan: every cell with its number for --cell")] = False,
    cell: Annotated[int | None, typer.Option(help="run cell K (0-based, see --list-cells) alone, e.g. from an #SBATCH --array task")] = None,
    fmt: Annotated[TableOrJson, typer.Option("--format", help="--list-cells/--status output")] = TableOrJson.table,
    tune: Annotated[int | None, typer.Option(help="also give every cell the same N-trial hyperparameter search on val (capbench tune), then re-run each best configuration over the seeds on test: the board's '(tuned, N=..)' rows")] = None,
    space: _Space = "default",
    sampler: _Sampler = "random",
    storage: _Storage = None,
    prune: _Prune = False,
):
    """Run every decoder x encoder (x seed) cell on one split, resumably, then show the board.

    With --shard i/N, only this machine's share of the cells (the same split on every machine).
    With --launcher slurm, each cell is a Slurm job-array task (docs/cluster.md)."""
    from benchmark.config import load_config, parse_seeds
    from benchmark.matrix import idle_shard, matrix_plan, parse_shard, run_matrix
    from benchmark.report import leaderboard, render_rich

    part = parse_shard(shard) if shard is not None else None
    cfg = load_config(config, {"dataset": dataset, "train.epochs": epochs, "pretrained": pretrained,
                               "device": device,
                               "results_dir": str(results_dir) if results_dir else None})
    plan = matrix_plan(config, archs.split(",") if archs else None,
                       encoders.split(",") if encoders else None,
                       parse_seeds(seeds) if seeds else None, cfg.seed)
    _matrix_check_flags(launcher, parallel, slurm, wait, board_job)
    launched = status or list_cells or cell is not None or retry_failed or launcher == Launcher.slurm or (
        launcher == Launcher.local and parallel > 1)
    if launched and tune is not None:
        raise ConfigError("--tune runs the studies in this process: leave out --launcher, --cell, "
                          "--status and --list-cells (on a cluster, share a --storage URL between "
                          "`capbench tune` workers)")
    if launched:
        raise typer.Exit(_matrix_launch(cfg, plan, part, config, dict(
            launcher=launcher.value if launcher else "local", parallel=parallel,
            slurm=slurm or [], status=status, retry_failed=retry_failed, wait=wait,
            board_job=board_job, list_cells=list_cells, cell=cell, fmt=fmt.value)))
    counter = {"n": 0, "of": plan.size}

    def on_plan(cells, planned):
        counter["of"] = len(cells)
        if part is not None:
            console.print(f"[bold]matrix shard {part}[/]: {len(cells)} of {len(planned)} cells",
                          highlight=False)
        if part is not None and not cells:
            units, busy = idle_shard(planned, part)
            console.print(f"[yellow]note:[/] nothing to run on this shard: the matrix has {units} "
                          f"(encoder, decoder, variant) unit(s), each run whole (all its seeds) "
                          f"by one shard, so only shard(s) {', '.join(map(str, busy))} of "
                          f"{part.count} get cells", highlight=False)

    def on_cell(cell):
        counter["n"] += 1
        colour = {"ok": "green", "done": "cyan", "failed": "red"}[cell.status]
        extra = f"  {cell.error}" if cell.error else f"  {cell.seconds:.0f} s" if cell.seconds else ""
        variant = escape(f" [{cell.variant}]") if cell.variant else ""  # not a rich style tag
        console.print(f"[bold]matrix {counter['n']}/{counter['of']}[/] {cell.arch} x {cell.encoder}{variant} "
                      f"seed {cell.seed}: [{colour}]{cell.status}[/]{extra}", highlight=False)

    tuned = _plan_matrix_tuning(cfg, plan, tune, space, sampler, storage, prune, part)
    result = run_matrix(cfg, plan.archs, plan.encoders, plan.seeds, console, on_cell, plan.variants,
                        shard=part, on_plan=on_plan)
    refs = _matrix_references(plan.references, cfg, part)
    finals = _run_matrix_tuning(tuned, plan.seeds)
    render_rich(leaderboard(result.records(cfg.results_dir) + [o.record for o in refs if o.record]
                            + finals), console)
    for enc, sec in result.feature_seconds.items():
        console.print(f"features {enc}: {sec:.0f} s (once, shared by its decoders)")
    which = (f"matrix: {result.planned} cells" if part is None else
             f"matrix shard {part}: {len(result.cells)} of {result.planned} cells")
    console.print(f"{which}, {result.count('ok')} run, {result.count('done')} "
                  f"already done, {result.count('failed')} failed; wall {result.wall_seconds / 60:.1f} min")
    if result.count("failed"):
        console.print(f"[red]failures recorded in {_q(Path(cfg.results_dir) / 'failures')}[/]")
        raise typer.Exit(1)
    if any(o.status == "failed" for o in refs):
        raise typer.Exit(1)


_STATE_COLOURS = {"done": "green", "running": "cyan", "queued": "blue", "failed": "red",
                  "not started": "white", "unknown": "yellow"}


def _matrix_check_flags(launcher, parallel: int, slurm, wait: bool, board_job: bool) -> None:
    """ConfigError for a launcher flag given without the launcher it belongs to (otherwise
    ignored: a forgotten --launcher would train the whole matrix in this process)."""
    needs = [("--slurm", bool(slurm), Launcher.slurm), ("--wait", wait, Launcher.slurm),
             ("--board-job", board_job, Launcher.slurm),
             (f"--parallel {parallel}", parallel > 1, Launcher.local)]
    for flag, given, wanted in needs:
        if given and launcher != wanted:
            raise ConfigError(f"{flag} needs --launcher {wanted.value}"
                              + (f" (this command has --launcher {launcher.value})" if launcher else ""))


def _matrix_launch(cfg, plan, part, config: str | None, opts: dict) -> int:
    """``matrix --list-cells/--status/--cell/--launcher``: call :mod:`benchmark.launcher` and
    render; returns the exit status (1 when a cell failed)."""
    import json

    from benchmark.launcher import (
        board_records,
        launch_matrix,
        matrix_status,
        parse_settings,
        slurm_settings,
        submit_board_job,
        wait_for_cells,
    )
    from benchmark.matrix import plan_cells, run_cell
    from benchmark.report import leaderboard, render_rich

    if opts["list_cells"]:
        planned = plan_cells(cfg, plan.archs, plan.encoders, plan.seeds, plan.variants)
        rows = [{"index": i, "arch": c.arch, "encoder": c.encoder, "variant": c.variant,
                 "seed": c.seed, "config_id": c.config_id} for i, c in enumerate(planned)]
        if opts["fmt"] == "json":
            print(json.dumps({"cells": rows, "count": len(rows)}, indent=1))
        else:
            _matrix_table(rows, f"matrix plan: {len(rows)} cells (run one with --cell K)")
        return 0
    if opts["cell"] is not None:
        one = run_cell(cfg, plan, opts["cell"], console)
        colour = {"ok": "green", "done": "cyan", "failed": "red"}[one.status]
        console.print(f"[bold]matrix cell {opts['cell']}[/] {one.arch} x {one.encoder} seed {one.seed}: "
                      f"[{colour}]{one.status}[/] {_q(one.error or one.run_id or '')}", highlight=False)
        return int(one.status == "failed")
    if opts["status"]:
        return _matrix_status_view(matrix_status(cfg, plan, part), opts["fmt"])
    settings = (slurm_settings(config, parse_settings(opts["slurm"]))
                if opts["launcher"] == "slurm" else {})

    def on_done(index, result):
        bad = isinstance(result, BaseException)
        console.print(f"[bold]matrix cell {index}[/]: {'[red]failed[/] ' + _q(result) if bad else '[green]ok[/] ' + _q(result)}",
                      highlight=False)

    out = launch_matrix(cfg, plan, opts["launcher"], settings=settings, parallel=opts["parallel"],
                        shard=part, retry_failed=opts["retry_failed"], on_done=on_done)
    skipped = ", ".join(f"{n} {s}" for s in ("done", "queued", "running", "failed")
                        if (n := sum(x.state == s for x in out.skipped)))
    console.print(f"matrix: {len(out.submitted)} cell(s) {'submitted' if opts['launcher'] == 'slurm' else 'run'}"
                  f"{'; skipped ' + skipped if skipped else ''}", highlight=False)
    if opts["launcher"] == "slurm":
        ids = [s.job_id for s in out.submitted]
        if ids:
            console.print(f"job array {ids[0].split('_')[0]} ({len(ids)} task(s)); job folder "
                          f"{_q(Path(cfg.results_dir) / 'submitit')}", highlight=False)
        # the board waits for this array and the cells' earlier tasks still queued or running
        ids += [s.job_id for s in out.skipped if s.state in ("queued", "running") and s.job_id]
        if opts["board_job"] and ids:
            console.print(f"board job {submit_board_job(cfg.results_dir, ids, settings)} writes "
                          f"{_q(Path(cfg.results_dir) / 'LEADERBOARD.md')} when the array ends")
        elif opts["board_job"]:
            console.print("no board job: no cell is queued or running; capbench report "
                          f"--results-dir {_q(cfg.results_dir)} shows the board", highlight=False)
        if not opts["wait"]:
            console.print("follow it with the same command and --status; when it has ended: "
                          f"capbench report --results-dir {_q(cfg.results_dir)}", highlight=False)
            return 0
    states = wait_for_cells(cfg, plan, part) if opts["launcher"] == "slurm" else matrix_status(cfg, plan, part)
    render_rich(leaderboard(board_records(cfg.results_dir, states)), console)
    return _matrix_status_view(states, "table") if any(s.state == "failed" for s in states) else 0


def _matrix_table(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for key in rows[0] if rows else ["index"]:
        table.add_column(key)
    for row in rows:
        table.add_row(*[f"[{_STATE_COLOURS[v]}]{v}[/]" if k == "state" else _q(v)
                        for k, v in row.items()])
    console.print(table)


def _matrix_status_view(states: list, fmt: str) -> int:
    """``matrix --status``: a row per cell, then each failed cell's log tail; returns 1 when a
    cell failed."""
    import json

    rows = [{"index": s.index, "arch": s.cell.arch, "encoder": s.cell.encoder,
             "variant": s.cell.variant, "seed": s.cell.seed, "state": s.state,
             "job": s.job_id or "", "detail": s.detail} for s in states]
    counts = {k: sum(s.state == k for s in states) for k in _STATE_COLOURS}
    if fmt == "json":
        for row, s in zip(rows, states, strict=True):
            row["log"] = s.log
        print(json.dumps({"cells": rows, "counts": counts}, indent=1))
    else:
        _matrix_table(rows, "matrix status")
        for s in states:
            if s.state == "failed" and s.log:
                console.print(f"[red]cell {s.index}[/] ({s.cell.arch} x {s.cell.encoder} seed "
                              f"{s.cell.seed}), the end of its log:\n{_q(s.log)}", highlight=False)
        console.print("matrix: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n), highlight=False)
    return int(counts["failed"] > 0)


def _plan_matrix_tuning(cfg, plan, tune, space, sampler, storage, prune, part) -> list:
    """``matrix --tune N``: every cell's study checked (spaces, storage) before any cell runs
    (:func:`benchmark.tuning.plan_tuning`); [] without --tune."""
    if tune is None:
        return []
    from benchmark.tuning import TuneSettings, plan_tuning

    if part is not None or len(plan.variants) > 1:
        raise ConfigError("--tune with --shard or matrix.variants: tune one plain matrix on one "
                          "machine (or share a --storage URL between `capbench tune` workers)")
    settings = TuneSettings("", "", sampler, cfg.seed, tune, prune, space)
    return plan_tuning(cfg, plan.archs, plan.encoders, settings, storage)


def _run_matrix_tuning(cells: list, seeds: list[int]) -> list:
    """The tuned cells' studies and final runs (:func:`benchmark.tuning.tune_matrix`), one
    line per trial; returns the final records."""
    from benchmark.tuning import tune_matrix

    out = tune_matrix(cells, seeds, console, lambda line: console.print(
        f"[bold]tune[/] {escape(line)}", highlight=False))
    return [r for _, finals in out for r in finals]


def _matrix_references(models: list[str], cfg, part) -> list:
    """A matrix config's ``references``: each pretrained captioner scored once (first shard)
    as a reference row (:func:`benchmark.hf_captioners.run_references`), one line each."""
    from benchmark.hf_captioners import run_references

    def on_reference(o) -> None:
        colour = {"ok": "green", "done": "cyan", "failed": "red"}[o.status]
        extra = f"  {_q(o.error)}" if o.error else f"  {o.seconds:.0f} s" if o.status == "ok" else ""
        console.print(f"[bold]matrix reference[/] {_q(o.model)}: [{colour}]{o.status}[/]{extra}",
                      highlight=False)

    return run_references(models, cfg.dataset, device=cfg.device, results_dir=cfg.results_dir,
                          first_shard=part is None or part.index == 1, on_reference=on_reference)


_Space = Annotated[str, typer.Option(help="search space: configs/search/NAME.yaml (default, tiny) or a YAML path")]
_Sampler = Annotated[str, typer.Option(help="random (seeded; what expected validation performance assumes) or tpe")]
_Storage = Annotated[str | None, typer.Option(help="Optuna storage, any SQLAlchemy URL (postgresql://... for many machines); default sqlite under <results-dir>/tuning/<study>.db")]
_Prune = Annotated[bool, typer.Option("--prune", help="stop trials whose per-epoch validation CIDEr-D is below the median of earlier trials (Optuna's MedianPruner)")]


@app.command(rich_help_panel="Train & compare", epilog="Example: `capbench tune --config tiny --arch attn_lstm --trials 3 --space tiny`")
@_guard
def tune(
    arch: Annotated[str | None, typer.Option(help="decoder to tune")] = None,
    encoder: Annotated[str | None, typer.Option(help="encoder of the cell")] = None,
    config: Annotated[str | None, typer.Option(help="preset or YAML: the base config every trial starts from")] = None,
    trials: Annotated[int, typer.Option(help="trials (the budget), each a run scored on the validation split")] = 8,
    space: _Space = "default",
    sampler: _Sampler = "random",
    seed: Annotated[int, typer.Option(help="the sampler's seed (trial k's parameters depend only on it and k)")] = 0,
    storage: _Storage = None,
    study: Annotated[str | None, typer.Option(help="study name (default <decoder>-<encoder>-<dataset>)")] = None,
    prune: _Prune = False,
    final_seeds: Annotated[str | None, typer.Option(help="then re-run the best configuration over these seeds on test, e.g. 0,1,2")] = None,
    dataset: Annotated[str | None, typer.Option(help="'shapes' or a Karpathy dataset.json")] = None,
    epochs: Annotated[int | None, typer.Option(help="training epochs per trial")] = None,
    pretrained: Annotated[bool | None, typer.Option("--pretrained/--no-pretrained", help="pretrained encoder weights or a seeded random init")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, mps")] = None,
    results_dir: Annotated[Path | None, typer.Option(help="where trial records (and the default SQLite study) go")] = None,
):
    """Search one (decoder, encoder) cell's hyperparameters with seeded trials on the validation split.

    N trials through Optuna, resumable; prints each trial and the best configuration."""
    from benchmark.config import load_config, parse_seeds
    from benchmark.report import leaderboard, render_rich
    from benchmark.tuning import TuneSettings, plan_tuning, tune_matrix

    cfg = load_config(config, {"decoder": arch, "encoder": encoder, "dataset": dataset,
                               "train.epochs": epochs, "pretrained": pretrained, "device": device,
                               "results_dir": str(results_dir) if results_dir else None})
    seeds = parse_seeds(final_seeds) if final_seeds else []
    cells = plan_tuning(cfg, [cfg.decoder], [cfg.encoder],
                        TuneSettings("", "", sampler, seed, trials, prune, space), storage, study)
    (result, finals), = tune_matrix(cells, seeds, console, lambda line: console.print(
        f"[bold]tune[/] {escape(line)}", highlight=False))
    t = Table(title=f"study {escape(result.settings.study)} ({len(result.trials)}/"
                    f"{result.settings.budget} trials; storage {escape(cells[0].settings.storage)})")
    for c in ("trial", "state", "val CIDEr-D", "parameters"):
        t.add_column(c, justify="right" if c in ("trial", "val CIDEr-D") else "left")
    for k, info in sorted(result.trials.items()):
        best = " [bold green]best[/]" if k == result.best else ""
        value = "-" if info["value"] is None or info["value"] != info["value"] else f"{100 * info['value']:.1f}"
        t.add_row(str(k), info["state"] + best, value,
                  escape(", ".join(f"{n}={v:.3g}" if isinstance(v, float) else f"{n}={v}"
                                   for n, v in info["params"].items())))
    console.print(t)
    if finals:
        render_rich(leaderboard(finals, baselines=False), console)


@app.command(rich_help_panel="Diagnose", epilog="Example: `capbench check --baseline results/baselines/tiny.json`")
@_guard
def check(
    baseline: Annotated[Path, typer.Option(help="baseline JSON to compare with")] = Path("results/baselines/tiny.json"),
    update: Annotated[bool, typer.Option(help="write the measured figures as the new baseline instead of comparing")] = False,
    preset: Annotated[str, typer.Option(help="preset the cells run (when updating)")] = "tiny",
):
    """Run the tiny preset per decoder (and a few encoders) and compare with a stored baseline.

    Metrics below baseline - tolerance fail; throughput changes are only printed."""
    from benchmark.check import run_check, update_baseline

    if update:
        console.print(f"wrote baseline {_q(baseline)} ({update_baseline(baseline, preset)} cells)")
        return
    outcome = run_check(baseline)
    table = Table(title=f"capbench check vs {_q(baseline)}")
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
            err.print(f"[red]regression:[/] {_q(r.cell)} {r.name} {r.now:.4f} < baseline {r.baseline:.4f} "
                      f"- tolerance {r.tolerance:.3f}", highlight=False)
        raise typer.Exit(1)


bench_app = typer.Typer(rich_markup_mode="markdown", help="Time decoders, encoders, the feature store, extraction, the SCST reward and matrix products on synthetic inputs.",
                        epilog="Example: `capbench bench decoders all --peak`")
app.add_typer(bench_app, name="bench", rich_help_panel="Measure")

# The bench commands' shared options, each help text written once; the bench callback's older
# flag forms take the same ones hidden (_hidden).
_Names = Annotated[str, typer.Argument(help="names, comma-separated, or 'all'")]
_Device = Annotated[str, typer.Option(help="auto, cpu, cuda, mps")]
_Iters = Annotated[int, typer.Option(help="timed iterations (median reported)")]
_BatchSize = Annotated[int, typer.Option(help="batch size")]
_GridSize = Annotated[int, typer.Option(help="grid tokens N (196 = 14x14)")]
_GridDim = Annotated[int, typer.Option(help="grid feature dim D")]
_PooledDim = Annotated[int | None, typer.Option(help="pooled feature dim (default: grid_dim)")]
_VocabSize = Annotated[int, typer.Option(help="vocabulary size")]
_CaptionLen = Annotated[int, typer.Option(help="words per caption")]
_EmbedDim = Annotated[int, typer.Option(help="word embedding dim (d_model for transformer)")]
_HiddenDim = Annotated[int, typer.Option(help="RNN hidden dim / transformer FFN dim")]
_AttentionDim = Annotated[int, typer.Option(help="soft-attention dim")]
_NumLayers = Annotated[int, typer.Option(help="decoder layers")]
_NumHeads = Annotated[int, typer.Option(help="transformer heads")]
_BeamSize = Annotated[int, typer.Option(help="beam size for the beam-K figure")]
_RowsFormat = Annotated[BenchFormat, typer.Option("--format", help="table, csv or json")]
_LineFormat = Annotated[TableOrJson, typer.Option("--format", help="table (one line) or json")]
_CsvOutput = Annotated[Path | None, typer.Option(help="also write the rows as CSV here")]
_Peak = Annotated[bool, typer.Option("--peak", help="measure the device's matmul peak (fp32, bf16) and report each phase's utilisation = achieved GFLOP/s / peak")]
_Compile = Annotated[bool, typer.Option("--compile", help="also time each decoder's training step through torch.compile and report the speedup over eager")]


def _hidden(option):
    """``option`` (an ``Annotated[type, typer.Option(...)]`` alias) hidden from ``--help``."""
    kind, info = get_args(option)
    info = copy.copy(info)
    info.hidden = True
    return Annotated[kind, info]


@bench_app.callback(invoke_without_command=True)
@_guard
def bench(
    ctx: typer.Context,
    arch: Annotated[str | None, typer.Option(hidden=True, help="decoder(s) to time on synthetic features, comma-separated, or 'all' (now: bench decoders)")] = None,
    encoder: Annotated[str | None, typer.Option(hidden=True, help="encoder(s) to time on random pixels, comma-separated, or 'all' (now: bench encoders)")] = None,
    grid_size: _hidden(_GridSize) = 196,
    grid_dim: _hidden(_GridDim) = 2048,
    pooled_dim: _hidden(_PooledDim) = None,
    vocab_size: _hidden(_VocabSize) = 10000,
    batch_size: _hidden(_BatchSize) = 32,
    caption_len: _hidden(_CaptionLen) = 20,
    embed_dim: _hidden(_EmbedDim) = 512,
    hidden_dim: _hidden(_HiddenDim) = 512,
    attention_dim: _hidden(_AttentionDim) = 512,
    num_layers: _hidden(_NumLayers) = 1,
    num_heads: _hidden(_NumHeads) = 8,
    beam_size: _hidden(_BeamSize) = 5,
    iters: _hidden(_Iters) = 5,
    device: _hidden(_Device) = "auto",
    format: _hidden(_RowsFormat) = BenchFormat.table,
    output: _hidden(_CsvOutput) = None,
    peak: _hidden(_Peak) = False,
    reward: Annotated[str | None, typer.Option(hidden=True, help="time the SCST reward on this dataset's train split (now: bench reward)")] = None,
    gemm: Annotated[str | None, typer.Option(hidden=True, help="time matrix products MxKxN, comma-separated (now: bench gemm)")] = None,
    compile: _hidden(_Compile) = False,
    store: Annotated[int | None, typer.Option(hidden=True, help="scale benchmark of a synthetic feature store of N images (now: bench store)")] = None,
    store_dir: Annotated[Path | None, typer.Option(hidden=True, help="where --store builds its synthetic store (default: the system temp folder); it is deleted afterwards")] = None,
    extraction: Annotated[str | None, typer.Option(hidden=True, help="time feature extraction of --encoder (default resnet50) on this dataset (now: bench extraction)")] = None,
    images: Annotated[int, typer.Option(hidden=True, help="images for --extraction")] = 256,
    num_workers: Annotated[int | None, typer.Option(hidden=True, help="DataLoader workers for --extraction (default: auto)")] = None,
    encoder_batch_size: Annotated[int | None, typer.Option(hidden=True, help="batch size of the --encoder rows (default: --batch-size, at most 16)")] = None,
):
    """Time decoders on synthetic features and encoders on random pixels.

    The defaults are the Show-Attend-Tell setting: 196 x 2048 grid, 512-d, 10k words, batch
    32, 20 words.

    The older option forms (`capbench bench --arch all` is `capbench bench decoders all`) keep
    working, hidden from this help, and name the new form."""
    if ctx.invoked_subcommand is not None:
        return
    from benchmark.bench import DecoderWorkload
    from benchmark.fsutil import refuse_overwrite

    if output is not None:
        refuse_overwrite(output, "--output")  # a run record or dataset file is never replaced
    if gemm:
        _note(f"--gemm {gemm}", f"gemm {gemm}")
        return bench_gemm(gemm, iters, device, format)
    if store is not None:
        _note(f"--store {store}", f"store {store}")
        return bench_store(store, store_dir, batch_size, device, format)
    if extraction:
        _note(f"--extraction {extraction}", f"extraction {extraction}")
        return bench_extraction(extraction, encoder, images, batch_size, iters, num_workers,
                                device, format)
    if reward:
        _note(f"--reward {reward}", f"reward {reward}")
        bench_reward(reward, format)
        if not arch and not encoder:
            return
    if arch or encoder:
        flags = "".join(f" --{k}" for k, on in (("peak", peak), ("compile", compile)) if on)
        _note(" ".join(f"--{k} {v}" for k, v in (("arch", arch), ("encoder", encoder)) if v) + flags,
              *([f"decoders {arch}{flags}"] if arch else []), *([f"encoders {encoder}"] if encoder else []))
    w = DecoderWorkload(grid_size, grid_dim, pooled_dim or grid_dim, vocab_size, batch_size,
                        caption_len, embed_dim, hidden_dim, attention_dim, num_layers, num_heads,
                        beam_size)
    _bench_models(arch, encoder, w, iters, device, format, output, peak=peak, compile=compile,
                  encoder_batch_size=encoder_batch_size)


def _note(old: str, *new: str) -> None:
    """The one-line note an older ``capbench bench`` form prints, naming its new form(s)."""
    now = " and ".join(f"`capbench bench {n}`" for n in new)
    err.print(f"[yellow]note:[/] {_q(f'`capbench bench {old}` is now {now}')}", highlight=False)


def _bench_models(archs, encoders, w, iters, device, format, output, **options) -> None:
    """Time decoders/encoders (:func:`benchmark.bench.bench_models`) and render the rows."""
    import json

    from benchmark.bench import bench_models, rows_frame, table_cells

    rows, dev = bench_models(archs, encoders, w, device, iters=iters, log=err.print, **options)
    df = rows_frame(rows)
    if output:
        from benchmark.fsutil import atomic_write_text

        atomic_write_text(output, df.to_csv(index=False))
        err.print(f"wrote {_q(output)}")
    if format == "json":
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
    elif format == "csv":
        sys.stdout.write(df.to_csv(index=False))
    else:
        columns, cells = table_cells(df)
        table = Table(title=f"capbench bench on {dev} (median of {iters}; workload: {w})")
        for c in columns:
            table.add_column(c, justify="right")
        for r in cells:
            table.add_row(*r)
        console.print(table)


@bench_app.command("decoders", epilog="Example: `capbench bench decoders all --peak`")
@_guard
def bench_decoders(
    names: _Names = "all",
    grid_size: _GridSize = 196,
    grid_dim: _GridDim = 2048,
    pooled_dim: _PooledDim = None,
    vocab_size: _VocabSize = 10000,
    batch_size: _BatchSize = 32,
    caption_len: _CaptionLen = 20,
    embed_dim: _EmbedDim = 512,
    hidden_dim: _HiddenDim = 512,
    attention_dim: _AttentionDim = 512,
    num_layers: _NumLayers = 1,
    num_heads: _NumHeads = 8,
    beam_size: _BeamSize = 5,
    iters: _Iters = 5,
    device: _Device = "auto",
    format: _RowsFormat = BenchFormat.table,
    output: _CsvOutput = None,
    peak: _Peak = False,
    compile: _Compile = False,
):
    """Time decoders on synthetic features.

    Training tokens/s, beam-1/beam-K captions/s, batch-1 latency, FLOPs. The defaults are the
    Show-Attend-Tell setting: 196 x 2048 grid, 512-d, 10k words, batch 32, 20 words."""
    from benchmark.bench import DecoderWorkload
    from benchmark.fsutil import refuse_overwrite

    if output is not None:
        refuse_overwrite(output, "--output")  # a run record or dataset file is never replaced
    w = DecoderWorkload(grid_size, grid_dim, pooled_dim or grid_dim, vocab_size, batch_size,
                        caption_len, embed_dim, hidden_dim, attention_dim, num_layers, num_heads,
                        beam_size)
    _bench_models(names, None, w, iters, device, format, output, peak=peak, compile=compile)


@bench_app.command("encoders", epilog="Example: `capbench bench encoders resnet50,vit_b16`")
@_guard
def bench_encoders(
    names: _Names = "all",
    batch_size: Annotated[int, typer.Option(help="images a batch")] = 16,
    iters: Annotated[int, typer.Option(help="twice the timed iterations (half are timed, at least 2; median reported)")] = 5,
    device: _Device = "auto",
    format: _RowsFormat = BenchFormat.table,
    output: _CsvOutput = None,
):
    """Time encoders on random pixels (random weights), run as extraction runs them.

    Images/s, GFLOPs per image, batch-1 latency."""
    from benchmark.bench import DecoderWorkload
    from benchmark.fsutil import refuse_overwrite

    if output is not None:
        refuse_overwrite(output, "--output")  # a run record or dataset file is never replaced
    _bench_models(None, names, DecoderWorkload(), iters, device, format, output,
                  encoder_batch_size=batch_size, encoder_flag="--batch-size")


@bench_app.command("store", epilog="Example: `capbench bench store 100000`")
@_guard
def bench_store(
    n: Annotated[int, typer.Argument(help="images in the synthetic store, at least 2 (e.g. 100000)")],
    store_dir: Annotated[Path | None, typer.Option(help="where the synthetic store is built (default: the system temp folder); it is deleted afterwards")] = None,
    batch_size: _BatchSize = 32,
    device: _Device = "auto",
    format: _LineFormat = TableOrJson.table,
):
    """Measure the feature store at scale on a synthetic store of N images.

    The store has ResNet-50's grid size (49 x 2048, float16; 0.2 MB an image); the result is
    the peak RSS and the samples/s of reading, training and decoding from it."""
    from benchmark import bench as b
    from benchmark.device import select_device

    b.check_store_size(n)
    res = b.bench_store(n, select_device(device), folder=store_dir,
                        workload=b.StoreWorkload(batch_size=batch_size), log=err.print)
    _print_result(res, format, b.store_summary(res))


@bench_app.command("extraction", epilog="Example: `capbench bench extraction flickr8k-mini/dataset.json --encoder resnet50`")
@_guard
def bench_extraction(
    dataset: Annotated[str, typer.Argument(help="'shapes' or a Karpathy dataset.json")],
    encoder: Annotated[str | None, typer.Option(help="encoder(s), comma-separated, or 'all' (default resnet50)")] = None,
    images: Annotated[int, typer.Option(help="the dataset's first N images")] = 256,
    batch_size: _BatchSize = 32,
    iters: Annotated[int, typer.Option(help="alternating rounds (median reported)")] = 5,
    num_workers: Annotated[int | None, typer.Option(help="DataLoader workers (default: auto)")] = None,
    device: _Device = "auto",
    format: Annotated[TableOrJson, typer.Option("--format", help="table (one line each) or json")] = TableOrJson.table,
):
    """Time feature extraction end to end with each image decoder.

    pil is Pillow in the DataLoader's workers; torchvision is decode_jpeg and tensor transforms
    on the device (nvJPEG on CUDA)."""
    from benchmark import bench as b
    from benchmark.device import select_device

    b.check_extraction(images, batch_size, iters, num_workers)
    res = b.bench_extraction(dataset, b.extraction_names(encoder), select_device(device),
                             images=images, batch_size=batch_size, rounds=iters,
                             num_workers=num_workers, log=err.print)
    _print_result(res, format, b.extraction_summary(res, iters))


@bench_app.command("reward", epilog="Example: `capbench bench reward coco-mini/dataset.json`")
@_guard
def bench_reward(
    dataset: Annotated[str, typer.Argument(help="dataset whose train split is scored, e.g. shapes")],
    format: _LineFormat = TableOrJson.table,
):
    """Time the SCST reward: CIDEr-D with cached document frequencies vs pycocoevalcap's Cider."""
    from benchmark import bench as b

    res = b.bench_reward(dataset)
    _print_result(res, format, b.reward_summary(res, dataset))


@bench_app.command("gemm", epilog="Example: `capbench bench gemm 32x2048x2048,4096x4096x4096`")
@_guard
def bench_gemm(
    shapes: Annotated[str, typer.Argument(help="MxKxN, comma-separated, e.g. 32x2048x2048,4096x4096x4096")],
    iters: Annotated[int, typer.Option(help="timed products (best of at least 3)")] = 5,
    device: _Device = "auto",
    format: _LineFormat = TableOrJson.table,
):
    """Measure the GFLOP/s of fp32 matrix products of given shapes.

    The shapes a decoder's step loop multiplies run far from the device's peak."""
    from benchmark import bench as b

    res = b.bench_gemm(shapes, device, iters)
    _print_result(res, format, b.gemm_summary(res))


def _print_result(res: dict | list, format: str, text: str) -> None:
    """A bench result as JSON (``--format json``) or as one line of ``text``."""
    import json

    if format == "json":
        sys.stdout.write(json.dumps(res, indent=1) + "\n")
    else:
        console.print(text, highlight=False)


@app.command("gpu-table", rich_help_panel="Measure", epilog="Example: `capbench gpu-table --dataset flickr8k-mini/dataset.json --out gpu-table`")
@_guard
def gpu_table(
    out: Annotated[Path, typer.Option(help="folder for gpu-table.json, gpu-table.md and gpu-table.log")] = Path("gpu-table"),
    dataset: Annotated[Path, typer.Option(help="Karpathy dataset.json for the extraction and matrix steps")] = Path("../shared/data/flickr8k-mini/dataset.json"),
    device: Annotated[str, typer.Option(help="cuda (the table's purpose), cuda:N or cpu")] = "cuda",
    steps: Annotated[str | None, typer.Option(help="comma-separated subset of: encoders, decoders, extraction, ddp, matrix, compile (default: all, in that order)")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="tiny encoders, workloads and epochs: checks that every step runs (seconds each on a CPU); not figures")] = False,
    work: Annotated[Path | None, typer.Option(help="folder for the steps' run records and feature cache (default: a temporary one, deleted afterwards)")] = None,
):
    """Measure every GPU figure of the docs' "Measuring a GPU" page in one command.

    Encoder and decoder throughput and MFU, extraction with both image decoders, DDP against
    one process, the 12-cell matrix end to end and the torch.compile speedup, each step a
    subprocess with its own time limit (1.5 to 7 minutes); prints the tables last."""
    from benchmark.gpu_table import gpu_table as measure

    chosen = [s.strip() for s in steps.split(",") if s.strip()] if steps else None
    result = measure(out, str(dataset), device=device, quick=quick, steps=chosen, work=work,
                     log=err.print)
    sys.stdout.write((out / "gpu-table.md").read_text())
    if not all(s["ok"] for s in result["steps"].values()):
        raise typer.Exit(1)


@app.command("list", rich_help_panel="Train & compare", epilog="Example: `capbench list 'vit*'`")
@_guard
def list_models(
    pattern: Annotated[str, typer.Argument(help="shell wildcard on names, e.g. `'*vit*'`")] = "*",
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


@app.command(rich_help_panel="Train & compare", epilog="Example: `capbench baseline --dataset shapes --encoder resnet50 --no-pretrained`")
@_guard
def baseline(
    dataset: Annotated[str, typer.Option(help="'shapes' or a Karpathy dataset.json")] = "shapes",
    split: Annotated[str, typer.Option(help="split to score")] = "test",
    kind: Annotated[str, typer.Option(help="most-frequent, consensus, nn, or all (comma-separated)")] = "all",
    encoder: Annotated[str, typer.Option(help="encoder whose pooled features the nn baseline uses")] = "resnet50",
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="pretrained encoder weights (nn) or a seeded random init")] = True,
    k: Annotated[int, typer.Option(help="nearest training images the nn baseline pools captions from")] = 5,
    runs: Annotated[Path | None, typer.Option(help="also test every run record in this results folder (on this dataset's split) against the strongest blind baseline: paired bootstrap of CIDEr-D")] = None,
):
    """Score the blind and nearest-neighbour baselines of a dataset's test split.

    Blind baselines write one caption for every image: the most frequent training caption, or
    the best constant caption by CIDEr-D (consensus). The nearest-neighbour baseline gives each
    image the consensus caption of its k nearest training images (Devlin et al. 2015)."""
    from benchmark.config import load_config
    from benchmark.image_use import BASELINE_COLUMNS, VERDICT_COLUMNS, baseline_rows, runs_vs_blind_rows
    from benchmark.runner import run_baselines

    kinds = ["most-frequent", "consensus", "nn"] if kind == "all" else [x.strip() for x in kind.split(",")]
    cfg = load_config(None, {"encoder": encoder, "pretrained": pretrained, "dataset": dataset})
    ds, encoder, scores = run_baselines(cfg, kinds, split=split, k=k, console=console)
    _print_rows(f"baselines on {_q(ds.name)} {split} ({len(ds.split(split))} images)",
                BASELINE_COLUMNS, baseline_rows(scores, encoder, k), left=("baseline", "caption"))
    for name, b in scores.items():
        console.print(f"{name}: {_q(b['detail'])}", highlight=False)
    if runs is not None:
        _print_rows(f"runs in {_q(runs)} vs the strongest blind baseline (paired bootstrap, CIDEr-D x100)",
                    VERDICT_COLUMNS, runs_vs_blind_rows(runs, ds, scores, split),
                    left=("run", "decoder", "encoder", "better?"), styles={("better?", "no"): "red"})


def _print_rows(title: str, columns, rows, left=(), styles=None) -> None:
    """A table of text ``rows`` (escaped; ``styles[(column, text)]`` colours such a cell)."""
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c in left else "right")
    for r in rows:
        styled = [(styles or {}).get((c, v)) for c, v in zip(columns, r, strict=True)]
        table.add_row(*(f"[{s}]{v}[/]" if s else _q(v) for s, v in zip(styled, r, strict=True)))
    console.print(table)


@data_app.command("shapes", epilog="Example: `capbench data shapes --out data/shapes --n-images 200`")
@_guard
def data_shapes(
    out: Annotated[Path, typer.Option(help="output folder (dataset.json + images/)")],
    n_images: Annotated[int, typer.Option(help="number of images")] = 600,
    seed: Annotated[int, typer.Option(help="generator seed")] = 0,
    force: Annotated[bool, typer.Option(help="overwrite an existing dataset.json in --out")] = False,
):
    """Generate the embedded 'shapes' dataset in Karpathy format."""
    from benchmark.shapes import write_shapes

    path = write_shapes(out, n_images, seed, force=force)
    console.print(f"wrote {_q(path)} ({n_images} images)")


def _prepare_command(kind: str, captions: list[Path], images: Path, out: Path, splits: list[Path] | None,
                     seed: int, force: bool, check_images: bool, decode: bool) -> None:
    from rich.progress import Progress

    from benchmark.prepare import prepare

    with Progress(console=err, transient=True) as progress:
        task = progress.add_task("checking images", total=None)
        report = prepare(kind, captions=captions, images=images, out=out, splits=splits or None,
                         seed=seed, force=force, check_images="decode" if decode else check_images,
                         progress=lambda done, total: progress.update(task, completed=done, total=total))
    table = Table(title=f"{kind}: images per split")
    for col in ("split", "images"):
        table.add_column(col, justify="right" if col == "images" else "left")
    for split, n in report.counts.items():
        table.add_row(split, f"{n:,}")
    table.add_row("[bold]total[/]", f"[bold]{report.images:,}[/] ({report.captions:,} captions)")
    console.print(table)
    if report.issues():
        issues = Table(title="problems found")
        issues.add_column("what")
        issues.add_column("count", justify="right")
        issues.add_column("e.g.", overflow="fold")
        for label, count, examples in report.issues():
            issues.add_row(label, f"{count:,}", _q("\n".join(examples)))
        console.print(issues)
    for message in report.messages:
        console.print(f"- {_q(message)}", highlight=False)
    console.print(f"wrote {_q(report.out)}; check it with: capbench run --dataset {_q(report.out)} ...", highlight=False)


# data flickr8k/flickr30k/coco: the same options, but for the help of --captions, --images, --splits
_DatasetOut = Annotated[Path, typer.Option(help="dataset.json to write")]
_SplitSeed = Annotated[int, typer.Option(help="seed of the split made when no --splits is given")]
_Force = Annotated[bool, typer.Option(help="overwrite an existing --out file")]
_CheckImages = Annotated[bool, typer.Option("--check-images/--no-check-images", help="open every image with PIL (verify); --no-check-images only checks that files exist")]
_Decode = Annotated[bool, typer.Option(help="fully decode every image (catches truncated JPEGs; slower)")]


def _add_data_command(kind: str, doc: str, captions: str, images: str, splits: str, example: str) -> None:
    """Register ``capbench data KIND`` (:func:`_prepare_command`) with ``doc`` as its help and
    the help texts of its --captions, --images and --splits options."""

    def command(captions, images, out, splits=None, seed=0, force=False, check_images=True,
                decode=False):
        _prepare_command(kind, captions, images, out, splits, seed, force, check_images, decode)

    command.__annotations__ = {  # what Typer reads (objects: the help texts are arguments here)
        "captions": Annotated[list[Path], typer.Option(help=captions)],
        "images": Annotated[Path, typer.Option(help=images)], "out": _DatasetOut,
        "splits": Annotated[list[Path] | None, typer.Option(help=splits)], "seed": _SplitSeed,
        "force": _Force, "check_images": _CheckImages, "decode": _Decode}
    command.__name__ = command.__qualname__ = f"data_{kind}"
    command.__doc__ = doc
    data_app.command(kind, epilog=f"Example: `{example}`")(_guard(command))


_add_data_command(
    "flickr8k", "Write a Karpathy dataset.json for Flickr8k (Hodosh et al. 2013) from the downloaded captions.",
    captions="Kaggle captions.txt (image,caption), Flickr8k.token.txt or Karpathy's dataset_flickr8k.json",
    images="folder holding the .jpg files (e.g. Flicker8k_Dataset/ or Images/)",
    splits="Karpathy's dataset_flickr8k.json, or Flickr_8k.trainImages.txt, Flickr_8k.devImages.txt (dev = val) and Flickr_8k.testImages.txt (repeat the option); without it: a seeded split in Karpathy proportions",
    example="capbench data flickr8k --captions captions.txt --images Images --out f8k/dataset.json")
_add_data_command(
    "flickr30k", "Write a Karpathy dataset.json for Flickr30k (Young et al. 2014) from the downloaded captions.",
    captions="Kaggle results.csv (image_name| comment_number| comment), results_20130124.token or Karpathy's dataset_flickr30k.json",
    images="folder holding the .jpg files (e.g. flickr30k_images/)",
    splits="Karpathy's dataset_*.json, or split lists named `*train*`, `*dev*` or `*val*`, and `*test*` (repeat the option); without it: a seeded split in Karpathy proportions",
    example="capbench data flickr30k --captions results.csv --images flickr30k_images --out F30k/dataset.json")
_add_data_command(
    "coco", "Write a Karpathy dataset.json for COCO captions (Chen et al. 2015) from the annotation files.",
    captions="captions_train2014.json and captions_val2014.json (or the 2017 pair; repeat the option), or Karpathy's dataset_coco.json",
    images="folder holding train2014/ and val2014/ (or train2017/, val2017/)",
    splits="Karpathy's dataset_coco.json (matched by COCO id, so it also fits the 2017 files); without it: train -> train and val split by --seed into val/test halves",
    example="capbench data coco --captions captions_train2014.json --captions captions_val2014.json --images COCO --splits dataset_coco.json --out COCO/dataset.json")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover  (torchrun -m benchmark.cli run ...)
    main()
