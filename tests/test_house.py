"""The house's plan holds: no import cycles, one decoder factory, one declared run record."""

import ast
import json
from pathlib import Path

import jsonschema
import pytest
import torch
from torch import nn

from architectures import (
    HyperparameterError,
    create_decoder,
    list_decoders,
    list_encoders,
    register_decoder,
    resolve_decoder_hparams,
)
from architectures.decoders.base import CaptionDecoder, DecoderOutput
from architectures.registry import unregister
from benchmark.records import OPTIONAL_FIELDS, SCHEMA_PATH, RunRecord, load_record

ROOT = Path(__file__).resolve().parents[1]


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (never executed)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _import_graph() -> dict[str, set[str]]:
    """Explicit imports (top-level and inside functions) between the package's own modules."""
    mods = {}
    for p in [*ROOT.glob("architectures/**/*.py"), *ROOT.glob("benchmark/**/*.py")]:
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = p
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        for node in _runtime_nodes(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            graph[m] |= {t for t in targets if t in mods and t != m}
    return graph


def test_no_module_imports_a_module_that_imports_it_back():
    graph = _import_graph()
    assert "architectures.registry" in graph and len(graph) > 25

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    cycles = sorted(m for m in graph if m in reachable(m))
    assert cycles == []
    assert graph["architectures.registry"] == {"architectures.errors"}  # imports no model
    assert not any(t.startswith("benchmark") for m, ts in graph.items()
                   if m.startswith("architectures") for t in ts)


def test_ci_encoders_come_from_the_registry():
    assert list_encoders(ci=True) == ["resnet18", "vit_tiny"]
    assert list_encoders(ci=False) == ["clip_vit_b32", "resnet50", "vit_b16"]
    assert sorted(list_encoders()) == sorted(list_encoders(ci=True) + list_encoders(ci=False))


def test_factory_resolves_types_unknown_names_and_constructor_errors():
    hp = resolve_decoder_hparams("lstm", {"embed_dim": 32, "num_heads": 4, "transformer": {"num_layers": 9}})
    assert hp["embed_dim"] == 32 and "num_heads" not in hp and hp["num_layers"] == 1
    assert resolve_decoder_hparams("transformer", {"transformer": {"num_layers": 3}})["num_layers"] == 3
    with pytest.raises(HyperparameterError, match="embed_dims"):
        resolve_decoder_hparams("lstm", {"embed_dims": 3})
    with pytest.raises(HyperparameterError, match="hidden_dim='big' should be an integer"):
        resolve_decoder_hparams("lstm", {"hidden_dim": "big"})
    with pytest.raises(HyperparameterError, match="not divisible"):
        create_decoder("transformer", 10, 8, 8, {"embed_dim": 30, "num_heads": 4})


class _Echo(CaptionDecoder):
    """Throwaway decoder: a bag of grid features plus the previous word, with an unusual knob."""

    def __init__(self, vocab_size: int, grid_dim: int, pooled_dim: int, echo_gain: float = 0.25,
                 embed_dim: int = 16) -> None:
        super().__init__(vocab_size, grid_dim, pooled_dim)
        self.echo_gain = echo_gain
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.img = nn.Linear(grid_dim, embed_dim)
        self.fc = nn.Linear(embed_dim, vocab_size)

    def forward(self, grid, pooled, tokens, lengths):
        h = self.embed(tokens) + self.echo_gain * self.img(grid.mean(1)).unsqueeze(1)
        return DecoderOutput(self.fc(torch.tanh(h)))

    def init_state(self, grid, pooled):
        return {"img": self.echo_gain * self.img(grid.mean(1))}

    def step(self, tokens, state):
        return self.fc(torch.tanh(self.embed(tokens) + state["img"])), state


@pytest.fixture
def echo_decoder():
    register_decoder("echo_test")(_Echo)
    yield "echo_test"
    unregister("decoder", "echo_test")


@pytest.mark.slow
def test_a_new_decoder_is_one_registration_away(echo_decoder, tiny_shapes, tmp_path):
    from benchmark.bench import DecoderWorkload, bench_decoder
    from benchmark.config import load_config
    from benchmark.runner import run_experiment

    cfg = load_config("tiny", {"dataset": str(tiny_shapes), "decoder": echo_decoder,
                               "train.epochs": 1, "results_dir": str(tmp_path)})
    cfg.decoder_hparams = {"echo_gain": 0.75}
    record, path = run_experiment(cfg)
    assert record.arch == "echo_test" and record.config["decoder_hparams"]["echo_gain"] == 0.75
    assert load_record(path).metrics == record.metrics
    jsonschema.validate(json.loads(path.read_text()), json.loads(SCHEMA_PATH.read_text()))
    row = bench_decoder(echo_decoder, DecoderWorkload(grid_size=4, grid_dim=8, pooled_dim=8,
                                                      vocab_size=20, batch_size=2, caption_len=3),
                        torch.device("cpu"), iters=1, warmup=0)
    assert row["arch"] == "echo_test" and row["train_tokens_per_s"] > 0
    assert echo_decoder in list_decoders()


def _committed_records():
    return sorted(ROOT.glob("results/*/runs/*.json"))


def test_every_committed_record_validates_against_the_schema():
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    paths = _committed_records()
    assert len(paths) >= 20
    for p in paths:
        jsonschema.validate(json.loads(p.read_text()), schema)
        rec = load_record(p)
        assert rec.to_dict() == json.loads(p.read_text())  # RunRecord round-trips the file


def test_schema_and_run_record_declare_the_same_fields():
    schema = json.loads(SCHEMA_PATH.read_text())
    fields = set(RunRecord.__dataclass_fields__) - {"path"}
    assert set(schema["properties"]) == fields
    assert set(schema["required"]) == fields - set(OPTIONAL_FIELDS)  # old records lack them


def test_a_record_missing_a_field_is_named():
    from benchmark.errors import RecordError

    with pytest.raises(RecordError, match="'metrics' is missing"):
        RunRecord.from_dict({"run_id": "x", "arch": "a", "encoder": "e", "dataset": {}}, "x.json")


#: the house's size limits (issue 25): a function is read at once, and called without a table
MAX_FUNCTION_LINES = 120
MAX_PARAMETERS = 10


def _functions():
    """``(where, node)`` of every function in ``benchmark/`` (Typer commands aside: their
    parameters are the command's options)."""
    for p in sorted(ROOT.glob("benchmark/**/*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            command = any("command" in ast.unparse(d) or "callback" in ast.unparse(d)
                          for d in node.decorator_list)
            if not command:
                yield f"{p.relative_to(ROOT)}:{node.lineno} {node.name}", node


def test_functions_stay_short_and_narrow():
    long = [f"{w} ({n.end_lineno - n.lineno + 1} lines)" for w, n in _functions()
            if n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    wide = []
    for w, n in _functions():
        a = n.args
        names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)
                 if x.arg not in ("self", "cls")]
        if len(names) > MAX_PARAMETERS:
            wide.append(f"{w} ({len(names)} parameters)")
    assert long == [] and wide == []


def test_the_front_door_exports_the_api_without_loading_torch():
    import subprocess
    import sys

    code = ("import sys, benchmark\n"
            "assert 'torch' not in sys.modules, 'import benchmark loaded torch'\n"
            "from benchmark import run_experiment, load_run, score_captions\n"
            "print(sorted(benchmark.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import benchmark

    assert eval(out.stdout) == sorted(benchmark.__all__)  # noqa: S307 - our own printed list
    for name in benchmark.__all__:
        obj = getattr(benchmark, name)
        assert obj.__module__ == benchmark._EXPORTS[name], name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        benchmark.nope  # noqa: B018


def test_a_new_metric_is_one_registration_away():
    """A throwaway family (mean words per caption) registered like a real one is scored by
    score_captions, gets bootstrap intervals and paired tests, and shows in metric_status."""
    from benchmark import metrics
    from benchmark.errors import CapbenchError
    from benchmark.metrics.registry import FAMILIES, MetricFamily, ScoreResult
    from benchmark.stats import bootstrap_ci, paired_bootstrap

    def words(inp, wanted):
        per = [float(len(inp.predictions[i].split())) for i in inp.ids]
        return ScoreResult(list(inp.ids), {"Words": sum(per) / len(per)}, {"Words": per})

    fam = metrics.register_family(MetricFamily(
        name="words_test", metrics=("Words",), score=words,
        status=lambda options: {"Words": None}, needs_references=False,
        mean_of_images=("Words",)))
    try:
        preds = {1: "a red circle", 2: "a big blue square on the left", 3: "green"}
        refs = {i: ["a shape"] for i in preds}
        res = metrics.score_captions(preds, refs)
        assert res.metrics["Words"] == pytest.approx(11 / 3)
        assert res.metrics["CIDEr"] is not None  # the COCO metrics as before
        lo, hi = bootstrap_ci(res.per_image_block(), n_resamples=200)["Words"]
        assert 1 <= lo <= 11 / 3 <= hi <= 7
        shorter = metrics.score_captions({i: "a" for i in preds}, refs, metrics=("Words",))
        assert paired_bootstrap(res.per_image_block(), shorter.per_image_block(),
                                n_resamples=200)["Words"]["delta"] == pytest.approx(1 - 11 / 3)
        assert metrics.metric_status()["Words"] is None
        with pytest.raises(ValueError, match="registered already"):
            metrics.register_family(fam)
    finally:
        FAMILIES.pop("words_test")
    with pytest.raises(CapbenchError, match="unknown metric"):
        metrics.score_captions(preds, refs, metrics=("Words",))
