"""Steering effectiveness on the embedded default (server/embedded), served by a real steerd.

For each topic, the feature ``SearchFeatures(topic)`` ranks first is clamped at every
position to its ``steer_value`` (the labeller's measured clamp value, found on its own
prompts with its own judge: the corpus's word lists); a keyword classifier written here (not the corpus's word lists) judges the topic of
each continuation. Clamping must move at least 80% of 20 neutral prompts to the topic, for
greedy and for sampled decoding, while plain decoding lands there in at most 20%. Ablating the
feature on sampled continuations of prompts of its own topic must lower the topic rate
(greedy continuations of such prompts are reported too: the prompt's own topic words keep
them on topic, ablated or not).

``STEERING_EVAL_OUT=path.json`` also writes every rate (docs/default_model.md cites them).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from clients.client import ablate, clamp

pytestmark = pytest.mark.e2e

SAE = "topics_l1"
MAX_TOKENS = 40
ABLATION_SEEDS = 5  # sampled continuations per on-topic prompt

# The judge: distinctive words per topic, chosen by hand for this test (widened once after
# reading misjudged continuations: e.g. "the storm chasers swept ..." had no weather word).
KEYWORDS = {
    "ocean": "sailed swam marine tidal coastal underwater salty sea ocean ship sailors divers whale dolphins reef coral tide waves harbor boat "
             "shark seaweed anchor fishermen captain beach shore bay lighthouse seagulls shells",
    "space": "space launch station pilot mission solar orbited launched rocket planet orbit moon satellite galaxy star comet astronauts asteroid telescope "
             "nebula capsule cosmonauts astronomers lunar cosmic stellar orbital",
    "cooking": "cooks cooking kitchen stove table spicy savory chef baker soup bread cake onions garlic sauce pasta oven recipe butter flour "
               "kitchen bakery dough spices baked stirred chopped roasted delicious",
    "music": "music musical played sang performed band singer orchestra drummer guitarist song guitar melody piano drums chorus "
             "violin album concert rhythm lyrics trumpet symphony stage melodic",
    "sports": "sports football tennis court coach players coach team goalkeeper runners ball match goal championship referee score "
              "trophy stadium race tournament league penalty arena athletic",
    "weather": "weather sky chasers storms humid snowy thunderstorm rain storm cloud thunder lightning snow wind fog rainbow humidity temperature "
               "hail drizzle sunshine forecasters meteorologist rainy windy cloudy foggy",
    "animals": "animal animals farmer jungle forest wild dog cat horses rabbit elephant lion puppies cows fox owl monkeys sheep tiger "
               "squirrel zoo barn zookeepers veterinarian furry",
    "computing": "programmer data digital online binary code computer program server database software algorithm keyboard network "
                 "compiler bug processor website laptop programmers developers debugged",
}
_KW = {t: set(v.split()) for t, v in KEYWORDS.items()}

NEUTRAL = [
    "Yesterday my friend", "In the morning, we", "After a while, everyone", "Then the neighbors",
    "Today she", "Of course, my brother", "That evening, they", "Meanwhile, our family",
    "As usual, he", "Once again, the children", "We talked about the day. Then",
    "It was a quiet afternoon. Later that day,", "My friend remembered the story. Today",
    "Everyone agreed on the plan. In the morning,", "The weekend was long. After a while,",
    "She thought about the idea. Then", "They enjoyed a quiet moment. Yesterday",
    "It was a pleasant day at the park. Meanwhile,", "He forgot the answer. Suddenly",
    "Our family discussed the plan. As usual,",
]

ON_TOPIC = {
    "ocean": ["The sailors sailed toward the", "The divers swam past the coral and",
              "The fishermen fished near the harbor. Then", "A whale drifted along the bay while"],
    "space": ["The astronauts launched toward the", "The rocket orbited the moon and",
              "The astronomers observed a comet. Then", "The satellite flew past the planet while"],
    "cooking": ["The chef stirred the soup and", "The baker baked the bread. Then",
                "My grandmother chopped the onions while", "The cooks roasted the garlic near"],
    "music": ["The band played the song and", "The singer sang a melody. Then",
              "The orchestra rehearsed the symphony while", "The drummer recorded the album near"],
    "sports": ["The players kicked the ball and", "The team won the match. Then",
               "The coach trained for the championship while", "The runners raced toward the"],
    "weather": ["The rain poured over the valley and", "The storm swept across the plains. Then",
                "The thunder rumbled over the mountains while", "The forecasters said that the"],
    "animals": ["The farmer fed the horses and", "The zookeepers groomed the elephant. Then",
                "The dog chased a fox while", "The veterinarian petted the puppies near"],
    "computing": ["The programmers debugged the code and", "The engineer deployed the server. Then",
                  "The developers compiled a program while", "The hacker rebooted the computer near"],
}


def judge(text: str) -> str | None:
    """The topic with the most keyword hits (at least 2), or None."""
    words = re.findall(r"[a-z]+", text.lower())
    hits = Counter({t: sum(w in kw for w in words) for t, kw in _KW.items()})
    (best, n), *rest = hits.most_common()
    if n < 2 or (rest and rest[0][1] == n):
        return None
    return best


@pytest.fixture(scope="module")
def client(default_server):
    with default_server.client() as c:
        yield c


@pytest.fixture(scope="module")
def topic_features(client):
    out = {}
    for topic in KEYWORDS:
        found = client.search_features(topic, sae=SAE, limit=1)
        assert found, f"SearchFeatures({topic!r}) found nothing"
        assert found[0].steer_value > 0, f"the {topic} feature has no measured clamp value"
        out[topic] = found[0]
    return out


def _rates(client, jobs) -> list[str | None]:
    """Run (prompt, kwargs) generations concurrently; the judged topic of each."""
    def one(job):
        prompt, kw = job
        return judge(client.generate_text(prompt, max_tokens=MAX_TOKENS, **kw).text)

    with ThreadPoolExecutor(32) as pool:
        return list(pool.map(one, jobs))


DECODING = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 1.0}}


def _decoding(name: str, j: int) -> dict:
    """Sampling kwargs for prompt j: sampled runs get their own seed per prompt (one shared
    seed would make the 20 samples one correlated draw)."""
    return dict(DECODING[name], seed=100 + j) if name == "sampled" else dict(DECODING[name])


@pytest.fixture(scope="module")
def results(client, topic_features):
    res: dict = {"features": {t: {"index": f.index, "label": f.label,
                                  "clamp": round(f.steer_value, 3)}
                              for t, f in topic_features.items()}}
    for name in DECODING:
        base = _rates(client, [(p, _decoding(name, j)) for j, p in enumerate(NEUTRAL)])
        res[f"baseline_{name}"] = {t: base.count(t) / len(NEUTRAL) for t in KEYWORDS}
        jobs = [(p, dict(_decoding(name, j), interventions=[clamp(SAE, f.index, f.steer_value)]))
                for f in topic_features.values() for j, p in enumerate(NEUTRAL)]
        got = _rates(client, jobs)
        res[f"steered_{name}"] = {
            t: got[i * len(NEUTRAL):(i + 1) * len(NEUTRAL)].count(t) / len(NEUTRAL)
            for i, t in enumerate(topic_features)}
    ablation = {"greedy": [{"temperature": 0.0}],
                "sampled": [{"temperature": 1.0, "seed": s} for s in range(ABLATION_SEEDS)]}
    for name, kws in ablation.items():
        plain, ablated = {}, {}
        for t, f in topic_features.items():
            runs = [(p, kw) for p in ON_TOPIC[t] for kw in kws]
            a = _rates(client, runs)
            b = _rates(client, [(p, dict(kw, interventions=[ablate(SAE, f.index)])) for p, kw in runs])
            plain[t], ablated[t] = a.count(t) / len(runs), b.count(t) / len(runs)
        res[f"on_topic_plain_{name}"], res[f"on_topic_ablated_{name}"] = plain, ablated
    if os.environ.get("STEERING_EVAL_OUT"):
        Path(os.environ["STEERING_EVAL_OUT"]).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return res


def test_search_finds_each_topic_feature_first(topic_features):
    for topic, f in topic_features.items():
        assert f.topic == topic and f.label.startswith(topic), (topic, f.label)


def test_judge_reads_the_corpus_topics():
    assert judge("The sailors saw a whale near the harbor.") == "ocean"
    assert judge("We talked about the plan at home.") is None


@pytest.mark.parametrize("decoding", DECODING)
def test_clamping_a_topic_feature_moves_neutral_prompts_to_the_topic(results, decoding):
    steered, base = results[f"steered_{decoding}"], results[f"baseline_{decoding}"]
    for topic in KEYWORDS:
        assert steered[topic] >= 0.8, (topic, steered[topic], results["features"][topic])
        assert base[topic] <= 0.2, (topic, base[topic])


def test_ablating_a_topic_feature_lowers_the_topic_rate(results):
    plain, ablated = results["on_topic_plain_sampled"], results["on_topic_ablated_sampled"]
    assert sum(ablated.values()) < sum(plain.values()), (plain, ablated)


def test_cli_features_search_and_show(default_server):
    import subprocess
    import sys

    steer = [str(Path(sys.executable).with_name("steer")), "--target", default_server.target]
    out = subprocess.run([*steer, "features", "search", "ocean", "--json"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    found = json.loads(out)
    assert found and found[0]["label"].startswith("ocean")
    for rec in found:
        assert {"sae", "index", "label", "density", "max_activation"} <= set(rec)
        assert "ocean" in rec["label"] or "ocean" in rec["topic"]
    first = found[0]
    out = subprocess.run([*steer, "features", "show", f"{SAE}:{first['index']}", "--json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    shown = json.loads(out)
    assert (shown["sae"], shown["index"], shown["label"]) == (SAE, first["index"], first["label"])
    assert shown["examples"] and shown["top_tokens"]
    bad = subprocess.run([*steer, "features", "show", f"{SAE}:99999"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "out of range" in bad.stderr


def test_feature_rpc_errors(client):
    import grpc

    cases = [
        (lambda: client.get_feature("nope", 1), grpc.StatusCode.NOT_FOUND, "unknown SAE"),
        (lambda: client.get_feature(SAE, 1 << 20), grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
        (lambda: client.search_features(" "), grpc.StatusCode.INVALID_ARGUMENT, "query"),
        (lambda: client.search_features("ocean", limit=1000), grpc.StatusCode.INVALID_ARGUMENT, "limit"),
        (lambda: client.search_features("ocean", sae="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    ]
    for call, code, needle in cases:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == code and needle in e.value.details(), e.value.details()
    assert client.search_features("ocean")  # and the server still serves
