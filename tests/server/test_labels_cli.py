"""``steerd labels build`` / ``steerd labels import-neuronpedia`` through the CLI entry point.

The Neuronpedia records follow the public export (``neuronpedia-datasets`` S3
``v1/<modelId>/<saeId>/explanations/batch-N.jsonl.gz`` lines, and the old
``/api/explanation/export`` JSON list): ``index`` as a string, ``description``,
``modelId``, ``layer``, ``explanationModelName``, ``typeName`` and other fields.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch

from sae_runtime.labels import store as feats
from server.cli import main
from server.core import validate
from tests.fixtures.tiny import MODEL_DIR, corpus


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _np(index, description, layer="1-res-tiny", explainer="gpt-4o-mini", **kw) -> dict:
    return {"id": f"x{index}{explainer}", "modelId": "tiny-llama", "layer": layer, "index": index,
            "description": description, "explanationModelName": explainer,
            "typeName": "oai_token-act-pair", "authorId": "a", **kw}


def _jsonl_gz(path: Path, recs: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in recs) + "\n\n")
    return path


@pytest.fixture
def sae_copy(tiny_dir, tmp_path) -> Path:
    """A private copy of the tiny SAE (the files under tiny_dir are shared by the session)."""
    return Path(shutil.copytree(tiny_dir / "saes" / "resid_l1", tmp_path / "resid_l1"))


def test_build_then_import_keeps_stats_and_replaces_labels(tiny_dir, tmp_path, sae_copy, capsys):
    text = tmp_path / "c.txt"
    text.write_text("\n".join(corpus(60, seed=2)) + "\n")
    args = ["labels", "build", "--model", str(tiny_dir / MODEL_DIR), "--sae", str(sae_copy),
            "--corpus", str(text), "--tokens", "240", "--context", "20", "--batch", "4",
            "--checkpoint-every", "4", "--no-progress"]
    assert main([*args, "--stop-after", "4"]) == 0
    assert (sae_copy / (feats.LABELS_FILE + ".partial")).is_file()
    assert main([*args[:8], "--tokens", "200", *args[10:]]) == 2  # other arguments: refused
    assert "different build" in capsys.readouterr().err
    assert main(args) == 0  # resumes
    assert "wrote" in capsys.readouterr().out
    built = json.loads((sae_copy / feats.LABELS_FILE).read_text())
    assert built["labelling_tokens"] == 240 and not (sae_copy / (feats.LABELS_FILE + ".partial")).exists()
    a, b = built["features"][0], built["features"][1]

    batch0 = _jsonl_gz(tmp_path / "batch-0.jsonl.gz", [
        _np(str(a["index"]), "references to the open sea and sailing"),
        _np(str(a["index"]), "a duplicate explanation", explainer="claude"),
        _np(str(b["index"]), "   "),  # empty: skipped
    ])
    batch1 = _jsonl_gz(tmp_path / "batch-1.jsonl.gz", [_np(b["index"], "baking bread in an oven"),
                                                        _np("250", "the letter q")])
    assert main(["labels", "import-neuronpedia", str(batch0), str(batch1), "--sae-dir", str(sae_copy)]) == 0
    out = capsys.readouterr().out
    had_250 = 250 in {r["index"] for r in built["features"]}
    assert f"3 labels imported ({2 + had_250} replaced, {1 - had_250} added)" in out
    assert "1 duplicates" in out and "1 empty" in out
    merged = json.loads((sae_copy / feats.LABELS_FILE).read_text())
    recs = {r["index"]: r for r in merged["features"]}
    assert recs[a["index"]]["label"] == "references to the open sea and sailing"
    assert recs[b["index"]]["label"] == "baking bread in an oven"
    for r in (a, b):  # statistics kept
        kept = recs[r["index"]]
        assert (kept["density"], kept["examples"], kept["promoted"]) == (r["density"], r["examples"], r["promoted"])
        assert kept["label_source"] == "neuronpedia:tiny-llama/1-res-tiny (gpt-4o-mini)"
    assert recs[250]["label"] == "the letter q"
    untouched = built["features"][2]
    assert recs[untouched["index"]] == untouched
    # the server's search finds the imported words
    labels = {"s": feats.load_beside(sae_copy, "s", 256)}
    found = feats.search(labels, "sailing sea", validate.search_args("sailing sea", 0))
    assert [f.index for f in found] == [a["index"]]


def test_import_a_json_list_into_a_new_file_and_prefer_an_explainer(tmp_path, capsys):
    export = tmp_path / "export.json"
    export.write_text(json.dumps([_np("3", "first"), _np(3, "preferred", explainer="gemini"),
                                  _np(7, "seven")]))
    out = tmp_path / "labels.json"
    assert main(["labels", "import-neuronpedia", str(export), "--out", str(out), "--d-sae", "10",
                 "--prefer-explainer", "gemini"]) == 0
    lab = feats.FeatureLabels.load(out, "s", 10)
    assert (lab.get(3).label, lab.get(7).label, lab.get(5).label) == ("preferred", "seven", "(no label)")


@pytest.mark.parametrize("recs, extra, needle", [
    ([_np("12", "x")], [], "line 1: index 12 is out of range for d_sae=10"),
    ([_np("a1", "x")], [], "line 1: index 'a1' is not an integer"),
    ([{"description": "x"}], [], "line 1: no \"index\" field"),
    ([_np("1", "x"), _np("2", "y", layer="2-res-tiny")], [], "mixes several SAEs .* pass --layer"),
])
def test_import_errors_name_the_record(tmp_path, capsys, recs, extra, needle):
    import re

    f = tmp_path / "e.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs))
    assert main(["labels", "import-neuronpedia", str(f), "--out", str(tmp_path / "o.json"),
                 "--d-sae", "10", *extra]) == 2
    assert re.search(needle, capsys.readouterr().err)
    assert not (tmp_path / "o.json").exists()


def test_import_layer_filter_and_missing_d_sae(tmp_path, capsys):
    f = tmp_path / "e.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [_np("1", "one"), _np("2", "two", layer="2-res-tiny")]))
    out = tmp_path / "o.json"
    assert main(["labels", "import-neuronpedia", str(f), "--out", str(out)]) == 2
    assert "--d-sae" in capsys.readouterr().err
    assert main(["labels", "import-neuronpedia", str(f), "--out", str(out), "--d-sae", "4",
                 "--layer", "2-res-tiny"]) == 0
    lab = feats.FeatureLabels.load(out, "s", 4)
    assert set(lab.features) == {2}
