"""The ``surgery`` command line, through its real entry points.

One subprocess run of the installed ``surgery`` console script per subcommand (inspect,
prune, eval, bench, export), on tiny models from ``tests/cli_models.py`` named as
``cli_models:NAME`` specs, exactly as a user names ``my_pkg.models:factory``; the rest goes
through Typer's CliRunner (same app, in process) or the loaders directly.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from surgery.cli import app

TESTS = Path(__file__).resolve().parent.parent
SURGERY = Path(sys.executable).with_name("surgery")
ENV = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1", "COLUMNS": "200",
       "PYTHONWARNINGS": "ignore"}
TINY = ["helpers.cli_models:tiny_resnet", "--input-size", "3,16,16"]
DATA = ["--data", "helpers.cli_models:batches"]


def surgery(*args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    exe = str(SURGERY) if SURGERY.exists() else shutil.which("surgery")
    assert exe, "the surgery console script is not installed (pip install -e .)"
    res = subprocess.run([exe, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                         timeout=300)
    if ok:
        assert res.returncode == 0, f"surgery {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def leftovers(folder: Path, name: str) -> list[str]:
    """Temporary folders a run left beside ``folder/name``."""
    return [p.name for p in folder.iterdir() if p.name.startswith(f".{name}.")]




@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    """``surgery prune`` run once as a subprocess; its folder is shared by the tests below."""
    root = tmp_path_factory.mktemp("prune")
    surgery("prune", *TINY, *DATA, "--out", "pruned", "--latency-batch", "4", "--threads", "1",
            cwd=root)
    return root / "pruned"


# ---- prune ----------------------------------------------------------------------------------

def test_prune_writes_model_plan_and_report(pruned: Path) -> None:
    from surgery.cut.plan import PruningPlan

    names = {p.name for p in pruned.iterdir()}
    assert {"model.safetensors", "plan.json", "surgery.json", "source.json", "report.md",
            "report.html", "kept_per_group.png", "params_macs.png", "metrics.json"} <= names
    assert leftovers(pruned.parent, "pruned") == []
    plan = PruningPlan.load(pruned / "plan.json")
    assert [g.name for g in plan.groups] == ["stem (+1)", "conv1", "down"]
    metrics = json.loads((pruned / "metrics.json").read_text())
    dense, after = metrics["dense"], metrics["pruned"]
    assert after["macs"] <= 0.52 * dense["macs"]  # half the MACs removed
    assert dense["accuracy"] is not None and after["accuracy"] is not None
    assert dense["latency_ms"] > 0 and after["latency_batch"] == 4
    for png in ("kept_per_group.png", "params_macs.png"):
        assert (pruned / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (pruned / "report.md").read_text()
    assert "surgery prune helpers.cli_models:tiny_resnet --out pruned --sparsity 0.5 --budget macs" in md
    assert "| conv1 | channel | 16 |" in md
    assert f"| torch | {torch.__version__} |" in md
    assert "![kept per group](kept_per_group.png)" in md
    html = (pruned / "report.html").read_text()
    assert "<img src='kept_per_group.png'" in html and "<td>conv1</td>" in html


def test_pruned_folder_reloads_the_measured_model(pruned: Path) -> None:
    from helpers import cli_models
    from surgery.cli.folders import load_pruned
    from surgery.counting import accuracy, count_params

    folder = load_pruned(pruned)
    metrics = json.loads((pruned / "metrics.json").read_text())
    assert count_params(folder.model) == metrics["pruned"]["params"]
    acc, n = accuracy(folder.model, list(cli_models.batches()))
    assert n == 64 and acc == pytest.approx(metrics["pruned"]["accuracy"])
    dense_acc, _ = accuracy(folder.dense(), list(cli_models.batches()))
    assert dense_acc == pytest.approx(metrics["dense"]["accuracy"])


def test_plan_show(pruned: Path) -> None:
    res = invoke("plan", "show", str(pruned))
    assert res.exit_code == 0, res.output
    assert res.output.startswith("PruningPlan(") and "kept / atoms" in res.output
    assert "conv1" in res.output and "MACs / sample" in res.output
    assert invoke("plan", "show", str(pruned / "plan.json")).output == res.output
    assert invoke("plan", "show", str(pruned.parent)).exit_code == 1


def test_failed_prune_leaves_no_output_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = invoke("prune", *TINY, "--data", "helpers.cli_models:broken", "--eval-samples", "0",
                 "--out", str(out))
    assert res.exit_code == 1 and "calibration batch 1 does not run through the model" in res.output
    assert "Traceback" not in res.output
    res = invoke("prune", *TINY, *DATA, "--eval-data", "helpers.cli_models:broken", "--out",
                 str(out))
    assert res.exit_code == 1 and "evaluation batch 1 does not run through the model" in res.output
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_failure_while_writing_leaves_nothing_and_keeps_the_old_folder(tmp_path, monkeypatch):
    import surgery.cli.report

    def boom(folder, **kwargs):
        (Path(folder) / "report.md").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(surgery.cli.report, "write_report", boom)
    out = tmp_path / "nested" / "out"
    args = ["prune", *TINY, "--criterion", "magnitude", "--latency-batch", "0", "--out", str(out)]
    res = invoke(*args)
    assert res.exit_code == 1 and "disk full" in res.output
    assert not out.exists() and not out.parent.exists()  # nor the parent it created
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("old")
    res = invoke(*args)
    assert res.exit_code == 1 and "already exists" in res.output
    res = invoke(*args, "--overwrite")
    assert res.exit_code == 1 and "disk full" in res.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert leftovers(out.parent, "out") == []


def test_prune_overwrite_replaces_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    res = invoke("prune", *TINY, "--criterion", "random", "--budget", "params",
                 "--sparsity", "0.3", "--latency-batch", "0", "--out", str(out), "--overwrite")
    assert res.exit_code == 0, res.output
    assert not (out / "stale.txt").exists() and (out / "plan.json").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pruned"]["params"] <= 0.72 * metrics["dense"]["params"]
    assert metrics["dense"]["accuracy"] is None  # no data, no accuracy
    assert "accuracy" not in (out / "report.md").read_text()


def test_prune_image_folder_torchvision_checkpoint(tmp_path: Path) -> None:
    """A torchvision name with --checkpoint (.pth) and --num-classes, data from an ImageFolder."""
    import torchvision
    from PIL import Image

    from surgery.cli.folders import load_pruned

    for c, color in enumerate(("red", "blue")):
        (tmp_path / "images" / f"class{c}").mkdir(parents=True)
        for i in range(5):
            image = Image.new("RGB", (40 + i, 36), color)
            image.save(tmp_path / "images" / f"class{c}" / f"{i}.png")
    torch.manual_seed(3)
    net = torchvision.models.resnet18(num_classes=2)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "ck.pth")
    out = tmp_path / "out"
    res = invoke("prune", "resnet18", "--checkpoint", str(tmp_path / "ck.pth"), "--num-classes",
                 "2", "--input-size", "3,32,32", "--data", str(tmp_path / "images"),
                 "--criterion", "magnitude", "--sparsity", "0.3", "--batch-size", "4",
                 "--latency-batch", "0", "--no-compensate", "--out", str(out))
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dense"]["samples"] == 10 and metrics["pruned"]["accuracy"] is not None
    dense = load_pruned(out).dense()  # rebuilt from the checkpoint, not a fresh init
    for k, v in net.state_dict().items():
        assert torch.equal(dense.state_dict()[k], v), k


def test_prune_needs_data_for_mi_and_labels_for_label_target(tmp_path: Path) -> None:
    res = invoke("prune", *TINY, "--out", str(tmp_path / "a"))
    assert res.exit_code == 1 and "needs calibration data: pass --data" in res.output
    res = invoke("prune", *TINY, "--data", "helpers.cli_models:unlabelled", "--target", "labels",
                 "--out", str(tmp_path / "b"))
    assert res.exit_code == 1 and "carry no labels" in res.output
    assert list(tmp_path.iterdir()) == []


# ---- inspect --------------------------------------------------------------------------------

def test_inspect_with_graph(tmp_path: Path) -> None:
    res = surgery("inspect", *TINY, "--graph", "groups.svg", cwd=tmp_path)
    assert "helpers.cli_models:tiny_resnet: 3 prunable of 4 coupled groups" in res.stdout
    assert "stem (+1)" in res.stdout and "no: model output" in res.stdout
    assert "params 8,740" in res.stdout
    svg = (tmp_path / "groups.svg").read_text()
    assert "<svg" in svg and "stem (+1)" in svg and "output" in svg


def test_inspect_torchvision_resnet18() -> None:
    res = invoke("inspect", "resnet18", "--input-size", "3,32,32")
    assert res.exit_code == 0, res.output
    assert "resnet18 has random weights" in res.output and "--checkpoint" in res.output
    assert "resnet18: 12 prunable of 13 coupled groups" in res.output
    assert "layer1.0.conv1" in res.output and "params 11,689,512" in res.output


def test_inspect_factory_png_and_errors(tmp_path: Path) -> None:
    res = invoke("inspect", "helpers.cli_models:tiny_resnet_with_example", "--graph",
                 str(tmp_path / "g.png"))
    assert res.exit_code == 0, res.output
    assert "3 prunable of 4 coupled groups" in res.output and "read into" in res.output
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    res = invoke("inspect", "helpers.cli_models:tiny_resnet")
    assert res.exit_code == 1 and "pass --input-size" in res.output
    res = invoke("inspect", "no_such_model_name")
    assert res.exit_code == 1 and "not a torchvision or timm model name" in res.output
    res = invoke("inspect", "helpers.cli_models:not_a_model")
    assert res.exit_code == 1 and "not an nn.Module" in res.output
    res = invoke("inspect", *TINY, "--graph", "g.txt")
    assert res.exit_code == 1 and "must end in .svg or .png" in res.output


def test_inputs_the_model_cannot_take_are_one_clear_line(tmp_path: Path) -> None:
    res = invoke("prune", "helpers.cli_models:tiny_resnet", "--input-size", "1,16,16",
                 "--criterion", "magnitude", "--out", str(tmp_path / "p"))
    assert res.exit_code == 1
    assert "does not run on input size 1x16x16" in res.output and "--input-size" in res.output
    assert "Traceback" not in res.output and "RuntimeError: Given" in res.output
    assert not (tmp_path / "p").exists()


# ---- eval / bench / export ------------------------------------------------------------------

def test_eval_reproduces_the_prune_measurements(pruned: Path, tmp_path: Path) -> None:
    res = surgery("eval", str(pruned), *DATA, "--latency-batch", "2", "--json", "eval.json",
                  "--threads", "1", cwd=tmp_path)
    assert "accuracy (64 samples, ± standard error)" in res.stdout
    got = json.loads((tmp_path / "eval.json").read_text())
    metrics = json.loads((pruned / "metrics.json").read_text())
    for which in ("dense", "pruned"):
        assert got[which]["accuracy"] == pytest.approx(metrics[which]["accuracy"])
        assert got[which]["macs"] == metrics[which]["macs"]
    assert got["pruned"]["latency_batch"] == 2


def test_bench_latency_per_batch_size(pruned: Path, tmp_path: Path) -> None:
    res = surgery("bench", str(pruned), "--batch-sizes", "1,3", "--repeats", "2", "--json",
                  "bench.json", "--threads", "1", cwd=tmp_path)
    assert "batch 3 (ms)" in res.stdout
    got = json.loads((tmp_path / "bench.json").read_text())
    assert set(got) == {"dense", "pruned", "speedup"}
    assert got["pruned"]["params"] < got["dense"]["params"]
    assert got["pruned"]["macs"] < got["dense"]["macs"]
    assert set(got["pruned"]["latency_ms"]) == {"1", "3"} == set(got["speedup"])
    timing = got["pruned"]["latency_ms"]["3"]
    assert timing["rounds"] == 2 and timing["low_ms"] <= timing["median_ms"] <= timing["high_ms"]
    speed = got["speedup"]["3"]
    assert speed["ratio"] > 0 and ("faster" in res.stdout or "slower" in res.stdout)
    res = invoke("bench", str(pruned), "--batch-sizes", "0,x")
    assert res.exit_code == 1 and "--batch-sizes" in res.output


def test_export_onnx_matches_pytorch(pruned: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from surgery.cli.folders import load_pruned

    res = surgery("export", str(pruned), "--onnx", "m.onnx", cwd=tmp_path)
    assert "onnxruntime matches PyTorch" in res.stdout
    model = load_pruned(pruned).model
    x = torch.randn(5, 3, 16, 16)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x)
    assert (torch.from_numpy(got) - want).abs().max().item() < 1e-4


def test_eval_bench_export_refuse_other_folders(tmp_path: Path) -> None:
    for args in (["eval", str(tmp_path), *DATA], ["bench", str(tmp_path)],
                 ["export", str(tmp_path), "--onnx", str(tmp_path / "m.onnx")]):
        res = invoke(*args)
        assert res.exit_code == 1 and "not a folder written by 'surgery prune'" in res.output
    assert not (tmp_path / "m.onnx").exists()


def test_each_demo_writes_its_own_folder(monkeypatch) -> None:
    """``surgery demo resnet18`` once wrote plan.json into the folder ``make demo`` filled with
    the MiniLM model, which then no longer loaded: every demo has its own default folder, and
    a folder the user names is only replaced with --overwrite."""
    import surgery.cli.demo as demo

    seen = []
    monkeypatch.setattr(demo, "_demo_resnet18", lambda *a: seen.append(a[2:]))
    assert invoke("demo", "resnet18").exit_code == 0
    assert invoke("demo", "resnet18", "--out", "mine").exit_code == 0
    assert invoke("demo", "resnet18", "--out", "mine", "--overwrite").exit_code == 0
    assert seen == [(Path("surgery-demo-resnet18"), True), (Path("mine"), False),
                    (Path("mine"), True)]


def test_version() -> None:
    import surgery as package

    res = invoke("--version")
    assert res.exit_code == 0 and res.output.strip() == f"surgery {package.__version__}"


def test_demo_is_still_the_main_command() -> None:
    res = invoke("demo", "--help")
    assert res.exit_code == 0 and "MiniLM" in res.output and "resnet18" in res.output
    res = invoke("demo", "vgg")
    assert res.exit_code != 0 and "'vgg' is not one of 'minilm', 'resnet18'" in res.output


# ---- loaders --------------------------------------------------------------------------------

def test_timm_checkpoint_safetensors_and_num_classes(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    from surgery.cli.specs import load_model
    from surgery.errors import LoadError

    torch.manual_seed(5)
    net = timm.create_model("resnet10t", num_classes=3)
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = load_model("resnet10t", checkpoint=tmp_path / "w.safetensors", num_classes=3)
    assert loaded.inputs["shape"] == [3, 176, 176]  # timm's pretrained_cfg input size
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    with pytest.raises(LoadError, match="--num-classes"):
        load_model("resnet10t", checkpoint=tmp_path / "w.safetensors")
    assert load_model("timm:resnet10t", input_size=(3, 32, 32)).recipe["source"] == "timm"


def test_fashion_mnist_batches_fit_the_model() -> None:
    from surgery.cli.data import load_data
    from surgery.errors import AssetMissing

    try:
        data = load_data("fashion-mnist", {"kind": "image", "shape": [3, 32, 32]},
                         split="test", batch_size=4, limit=6)
    except AssetMissing:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    batches = list(data)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 32, 32), (2, 3, 32, 32)]
    assert data.name == "fashion-mnist:test" and batches[0][1].dtype == torch.int64
    x, _ = next(iter(load_data("fashion-mnist:train", {"kind": "image", "shape": [1, 64, 48]},
                               batch_size=2, limit=2)))
    assert tuple(x.shape) == (2, 1, 64, 48)


def _tokenizer():
    """A WordPiece tokenizer built offline from an eleven-word vocabulary."""
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"a good bad movie plot was".split()]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})


def _bert_folder(folder: Path, hidden: int, layers: int) -> Path:
    """A random-init BERT classifier over the eleven-word vocabulary, saved with its tokenizer
    as a Hugging Face folder (seeded: the same weights every call)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=11, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=16, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def test_text_csv_and_jsonl_batches(tmp_path: Path) -> None:
    from surgery.cli.data import label_ids, load_data, read_text_rows
    from surgery.errors import LoadError

    (tmp_path / "t.csv").write_text('text,label\n"a good movie",pos\nbad plot,neg\n"a, bad",neg\n')
    rows = read_text_rows(tmp_path / "t.csv")
    assert rows[2] == {"text": "a, bad", "label": "neg"}
    assert label_ids(rows) == [1, 0, 0] and label_ids(rows, {"neg": 1, "pos": 0}) == [0, 1, 1]
    lines = [{"sentence1": "a movie", "sentence2": "good", "y": 1},
             {"sentence1": "bad", "sentence2": "plot", "y": 0}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    assert read_text_rows(tmp_path / "t.jsonl", label_column="y")[0] == \
        {"text": "a movie", "text_pair": "good", "label": 1}

    tok = _tokenizer()
    inputs = {"kind": "text", "seq_len": 8, "keys": ["input_ids", "attention_mask"]}
    batches = list(load_data(str(tmp_path / "t.csv"), inputs, tokenizer=tok, batch_size=2))
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 8), (1, 8)]
    assert set(batches[0]) == {"input_ids", "attention_mask", "labels"}
    assert batches[0]["labels"].tolist() == [1, 0]
    assert batches[0]["input_ids"][0, :5].tolist() == [2, 5, 6, 8, 3]  # [CLS] a good movie [SEP]
    pair = next(iter(load_data(str(tmp_path / "t.jsonl"), inputs, tokenizer=tok, batch_size=2,
                               label_column="y")))
    assert pair["labels"].tolist() == [1, 0] and (pair["input_ids"] == 3).sum(1).tolist() == [2, 2]
    with pytest.raises(LoadError, match="needs a tokenizer"):
        load_data(str(tmp_path / "t.csv"), inputs)
    (tmp_path / "odd.jsonl").write_text('{"body": "a movie", "label": 1}\n')
    with pytest.raises(LoadError, match="no text column"):
        read_text_rows(tmp_path / "odd.jsonl")
    rows = read_text_rows(tmp_path / "odd.jsonl", text_column="body")
    assert rows == [{"text": "a movie", "label": 1}]


def _kept(group: dict) -> int:
    """Kept atoms of a plan.json group (ranges [a, b) or single indices)."""
    return sum(k[1] - k[0] if isinstance(k, list) else 1 for k in group["kept"])


def test_hugging_face_folder(tmp_path: Path, monkeypatch) -> None:
    """A local Hugging Face folder with its tokenizer: inspect and prune (magnitude) end to end;
    without the plugins, the error says so."""
    import surgery.cli.specs

    folder = _bert_folder(tmp_path / "tiny-bert", hidden=16, layers=1)
    (tmp_path / "t.csv").write_text("text,label\n" + "a good movie,1\nbad plot,0\n" * 4)

    res = invoke("inspect", str(folder), "--seq-len", "8")
    assert res.exit_code == 0, res.output
    assert "head" in res.output and "neuron" in res.output and "8 tokens" in res.output
    assert "Loading weights" not in res.output  # transformers' own bars stay out of Rich's
    assert "random weights" not in res.output  # a Hugging Face folder brings its own
    res = invoke("prune", str(folder), "--seq-len", "8", "--data", str(tmp_path / "t.csv"),
                 "--criterion", "magnitude", "--sparsity", "0.3", "--no-compensate",
                 "--latency-batch", "0", "--out", str(tmp_path / "out"))
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["pruned"]["samples"] == 8
    assert metrics["pruned"]["macs"] < metrics["dense"]["macs"]

    res = invoke("prune", str(folder), "--seq-len", "8", "--data", str(tmp_path / "t.csv"),
                 "--criterion", "magnitude", "--sparsity", "0.3", "--budget", "params",
                 "--budget-scope", "bert.encoder", "--kind-weights", "neuron=1,head=0,hidden=0",
                 "--latency-batch", "0", "--out", str(tmp_path / "scoped"))
    assert res.exit_code == 0, res.output
    plan = json.loads((tmp_path / "scoped" / "plan.json").read_text())
    assert plan["budget"]["scope"] == ["bert.encoder"]
    assert plan["budget"]["kind_weights"] == {"neuron": 1.0, "head": 0.0, "hidden": 0.0}
    assert {g["kind"] for g in plan["groups"] if _kept(g) < g["atoms"]} == {"neuron"}
    assert "of the parameters in `bert.encoder`" in (tmp_path / "scoped" / "report.md").read_text()
    res = invoke("prune", str(folder), "--seq-len", "8", "--data", str(tmp_path / "t.csv"),
                 "--kind-weights", "neuron:1", "--out", str(tmp_path / "bad"))
    assert res.exit_code == 1 and "kind=weight pairs" in res.output

    monkeypatch.setattr(surgery.cli.specs, "hf_plugins_available", lambda: False)
    res = invoke("inspect", str(folder))
    assert res.exit_code == 1
    assert "Hugging Face support arrives with the BERT/ViT plugins" in res.output


def test_exclude_and_kinds_on_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "p"
    res = invoke("prune", *TINY, *DATA, "--exclude", "down", "--exclude", "fc",
                 "--kinds", "channel", "--sparsity", "0.2", "--latency-batch", "0",
                 "--eval-samples", "0", "--out", str(out))
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())
    assert not any(name.startswith(("down.", "fc.")) for name in plan["keep"])
    assert "excluded" in (out / "report.md").read_text()
    res = invoke("prune", *TINY, *DATA, "--exclude", "dwn", "--out", str(tmp_path / "q"))
    assert res.exit_code == 1 and "exclude pattern 'dwn' matches no module" in res.output


@pytest.mark.parametrize("exclude", [[], ["down", "fc"]])
def test_the_reports_command_reproduces_the_plan(tmp_path: Path, exclude: list[str]) -> None:
    """The report's Reproduce command, run as printed, makes the same plan (a list option
    spelled once per value, an empty one not at all)."""
    first, again = tmp_path / "a", tmp_path / "b"
    excluded = [a for pattern in exclude for a in ("--exclude", pattern)]
    res = invoke("prune", *TINY, *DATA, *excluded, "--sparsity", "0.3", "--latency-batch", "0",
                 "--eval-samples", "0", "--out", str(first))
    assert res.exit_code == 0, res.output
    command = json.loads((first / "metrics.json").read_text())["command"]
    args = shlex.split(command)
    assert args[:2] == ["surgery", "prune"] and args.count("--exclude") == len(exclude)
    args[args.index("--out") + 1] = str(again)
    res = invoke(*args[1:])
    assert res.exit_code == 0, (command, res.output)
    assert (json.loads((first / "plan.json").read_text())["keep"]
            == json.loads((again / "plan.json").read_text())["keep"])


PLAIN = "also loads with transformers' AutoModel*.from_pretrained"
NOT_PLAIN = ("this folder loads with surgery.io.load (widths differ across layers: not a plain "
             "Hugging Face folder; prune with --uniform-widths for one)")


def test_prune_says_what_loads_the_folder(tmp_path: Path) -> None:
    """Widths that differ across layers make a folder only surgery.io.load reads, and the
    output and report say so; --uniform-widths makes a plain Hugging Face folder, which
    transformers loads alone."""
    from transformers import AutoModelForSequenceClassification

    from surgery import io

    folder = _bert_folder(tmp_path / "bert", hidden=32, layers=2)
    (tmp_path / "t.csv").write_text("text,label\n" + "a good movie,1\nbad plot was,0\n" * 4)
    common = [str(folder), "--seq-len", "8", "--data", str(tmp_path / "t.csv"), "--sparsity",
              "0.3", "--budget", "params", "--budget-scope", "bert.encoder", "--latency-batch",
              "0", "--eval-samples", "0"]

    res = invoke("prune", *common, "--criterion", "magnitude", "--allocation", "global",
                 "--out", str(tmp_path / "global"))
    assert res.exit_code == 0, res.output
    assert NOT_PLAIN in " ".join(res.output.split())
    assert NOT_PLAIN in (tmp_path / "global" / "report.md").read_text()
    assert not (tmp_path / "global" / "config.json").exists()

    res = invoke("prune", *common, "--uniform-widths", "--out", str(tmp_path / "plain"))
    assert res.exit_code == 0, res.output
    assert PLAIN in " ".join(res.output.split())
    assert PLAIN in (tmp_path / "plain" / "report.md").read_text()
    plan = json.loads((tmp_path / "plain" / "plan.json").read_text())
    assert {g["kind"] for g in plan["groups"] if _kept(g) < g["atoms"]} == {"neuron"}
    ids = torch.tensor([[2, 5, 6, 8, 3, 0, 0, 0]])
    mask = (ids > 0).long()
    mine = io.load(tmp_path / "plain")(input_ids=ids, attention_mask=mask).logits
    theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "plain").eval()
    # the same weights; transformers' loader leaves them in other memory (copied into fresh
    # tensors the outputs agree to the bit), so the matrix products may round differently
    assert torch.allclose(theirs(input_ids=ids, attention_mask=mask).logits, mine, rtol=0,
                          atol=1e-6)
    # and its tokenizer: without one, transformers 5 builds an empty 5-token vocabulary
    # from the config alone and every text becomes [UNK]s
    from transformers import AutoTokenizer

    text = "a good movie"
    assert (AutoTokenizer.from_pretrained(tmp_path / "plain")(text)["input_ids"]
            == AutoTokenizer.from_pretrained(folder)(text)["input_ids"])

    res = invoke("prune", *common, "--uniform-widths", "--allocation", "global",
                 "--out", str(tmp_path / "refused"))
    assert res.exit_code == 1 and "allocation='uniform'" in res.output
