"""Feature-label files: loading checks, lookup and keyword search order."""

from __future__ import annotations

import json

import pytest

from sae_runtime.errors import SAEFormatError
from sae_runtime.labels import store as feats


def _write(tmp_path, records, **top):
    path = tmp_path / feats.LABELS_FILE
    path.write_text(json.dumps({"format": feats.FORMAT, "d_sae": 10, "features": records, **top}))
    return path


RECORDS = [
    {"index": 0, "label": "ocean: whale, reef", "score": 0.2, "density": 0.01, "topic": "ocean"},
    {"index": 1, "label": "ocean: waves, tide, ship", "score": 0.7, "density": 0.05, "topic": "ocean"},
    {"index": 2, "label": "mixed: oceanic, the", "score": 0.9, "density": 0.2, "topic": "general"},
    {"index": 3, "label": "space: rocket", "score": 0.8, "top_tokens": ["rocket", "whale"]},
    {"index": 4, "label": "ocean: ship", "score": 0.7, "density": 0.09, "topic": "ocean"},
]


def test_search_ranks_whole_word_matches_then_score_then_density(tmp_path):
    lab = feats.FeatureLabels.load(_write(tmp_path, RECORDS), "s", 10)
    got = [f.index for f in feats.search({"s": lab}, "Ocean", 10)]
    # "oceanic" is only a substring match: last despite the highest score; 4 and 1 tie on
    # score, and the denser one comes first.
    assert got == [4, 1, 0, 2]
    assert [f.index for f in feats.search({"s": lab}, "ocean ship", 10)] == [4, 1]
    assert [f.index for f in feats.search({"s": lab}, "whale", 10)] == [0, 3]  # top_tokens count
    assert feats.search({"s": lab}, "ocean", 2)[0].index == 4
    assert feats.search({"s": lab}, "volcano", 10) == []


def test_search_spans_saes_in_order(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = feats.FeatureLabels.load(_write(tmp_path / "a", RECORDS[:1]), "a", 10)
    b = feats.FeatureLabels.load(_write(tmp_path / "b", RECORDS[:1]), "b", 10)
    assert [f.sae for f in feats.search({"b": b, "a": a}, "ocean", 10)] == ["b", "a"]


def test_get_unlabelled_and_dead_features(tmp_path):
    lab = feats.FeatureLabels.load(_write(tmp_path, RECORDS, dead_features=[7]), "s", 10)
    assert lab.get(1).label.startswith("ocean")
    assert lab.get(7).dead and "dead" in lab.get(7).label
    assert not lab.get(8).dead and lab.get(8).label == "(no label)"


@pytest.mark.parametrize("records, top, needle", [
    ([{"index": 10, "label": "x"}], {}, "features[0]: index 10"),
    ([{"index": 1}], {}, "features[0]"),
    ([{"index": 1, "label": 3}], {}, "label of feature 1"),
    ([], {"d_sae": 11}, "d_sae=11"),
    ([], {"format": "other"}, "not a feature-label file"),
])
def test_bad_label_files_name_the_file_and_entry(tmp_path, records, top, needle):
    path = _write(tmp_path, records, **top)
    with pytest.raises(SAEFormatError, match=str(path)) as e:
        feats.FeatureLabels.load(path, "s", 10)
    assert needle in str(e.value)


def test_load_beside_is_none_without_a_file(tmp_path):
    assert feats.load_beside(tmp_path, "s", 10) is None
    _write(tmp_path, RECORDS)
    assert feats.load_beside(tmp_path, "s", 10).get(0).label == "ocean: whale, reef"
