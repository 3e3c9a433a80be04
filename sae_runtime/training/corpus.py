"""A synthetic multi-topic English corpus, deterministic by seed.

Eight topics with disjoint content vocabularies, plus "general" sentences that use none of
them. A document is a run of sentences; the topic persists from one sentence to the next
with probability ``STAY`` and otherwise switches (to another topic or to general talk), so
a model trained on it must track "what are we talking about" in its residual stream: the
kind of state an SAE turns into a topic feature.

Sentences are built from templates whose slots take topic words, so word order, function
words and openers are shared across topics and only the content words tell topics apart.

    python -m sae_runtime.training.corpus --docs 5 --seed 0   # print a sample
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator

GENERAL = "general"

# Content words per topic. Every slot is filled from the current topic's lists; words are
# distinct across topics (see tests/sae_runtime/test_default_pipeline.py).
TOPICS: dict[str, dict[str, list[str]]] = {
    "ocean": {
        "agent": ["the sailors", "the divers", "the fishermen", "the captain", "the crew"],
        "thing": ["the waves", "the tide", "the coral", "a whale", "the dolphins", "the ship",
                  "the seaweed", "the reef", "a shark", "the shells", "the anchor",
                  "the boat", "the current", "the seagulls", "the lighthouse"],
        "place": ["the open sea", "the harbor", "the deep ocean", "the coral reef",
                  "the sandy beach", "the rocky shore", "the bay"],
        "verb": ["sailed toward", "swam past", "drifted along", "dove under", "fished near",
                 "rowed across", "anchored by"],
        "adj": ["salty", "tidal", "coastal", "marine", "briny", "underwater"],
    },
    "space": {
        "agent": ["the astronauts", "the pilot", "the engineers at mission control",
                  "the cosmonauts", "the astronomers"],
        "thing": ["the rocket", "a comet", "the planet", "the moon", "the satellite",
                  "the galaxy", "a star", "the orbit", "the telescope", "an asteroid",
                  "the space station", "the nebula", "the capsule", "the launch pad"],
        "place": ["outer space", "the solar system", "a distant galaxy", "low orbit",
                  "the dark side of the moon", "the launch site"],
        "verb": ["orbited", "launched toward", "observed", "landed on", "docked with",
                 "flew past", "photographed"],
        "adj": ["cosmic", "orbital", "lunar", "stellar", "interplanetary", "weightless"],
    },
    "cooking": {
        "agent": ["the chef", "the baker", "the cooks", "my grandmother", "the kitchen staff"],
        "thing": ["the soup", "the bread", "a cake", "the onions", "the garlic", "the sauce",
                  "the pasta", "the oven", "a recipe", "the butter", "the flour",
                  "the frying pan", "the spices", "the dough"],
        "place": ["the kitchen", "the bakery", "the restaurant", "the stove",
                  "the dining table", "the pantry"],
        "verb": ["baked", "stirred", "chopped", "seasoned", "roasted", "tasted", "simmered"],
        "adj": ["delicious", "crispy", "savory", "spicy", "tender", "buttery"],
    },
    "music": {
        "agent": ["the band", "the singer", "the orchestra", "the drummer", "the guitarist"],
        "thing": ["the song", "the guitar", "a melody", "the piano", "the drums", "the chorus",
                  "the violin", "the album", "a concert", "the rhythm", "the lyrics",
                  "the trumpet", "the symphony", "the microphone"],
        "place": ["the concert hall", "the recording studio", "the stage", "the opera",
                  "the music festival", "the jazz club"],
        "verb": ["played", "sang", "composed", "rehearsed", "performed", "recorded", "tuned"],
        "adj": ["melodic", "loud", "harmonic", "rhythmic", "acoustic", "musical"],
    },
    "sports": {
        "agent": ["the players", "the coach", "the team", "the goalkeeper", "the runners"],
        "thing": ["the ball", "the match", "a goal", "the championship", "the referee",
                  "the score", "the trophy", "the stadium crowd", "the race", "the tournament",
                  "the league", "a penalty", "the finish line", "the season"],
        "place": ["the stadium", "the football field", "the tennis court", "the arena",
                  "the race track", "the gym"],
        "verb": ["kicked", "won", "scored", "defended", "trained for", "raced toward",
                 "celebrated"],
        "adj": ["athletic", "competitive", "victorious", "fast", "sporting", "olympic"],
    },
    "weather": {
        "agent": ["the forecasters", "the meteorologist", "the farmers watching the sky",
                  "the weather balloon", "the storm chasers"],
        "thing": ["the rain", "the storm", "a cloud", "the thunder", "the lightning", "the snow",
                  "the wind", "the fog", "a rainbow", "the humidity", "the temperature",
                  "the hail", "the drizzle", "the sunshine"],
        "place": ["the gray sky", "the valley", "the mountains", "the horizon", "the plains",
                  "the clouds above"],
        "verb": ["poured over", "swept across", "blew through", "froze", "drenched",
                 "rumbled over", "cleared above"],
        "adj": ["rainy", "windy", "cloudy", "foggy", "snowy", "humid"],
    },
    "animals": {
        "agent": ["the zookeepers", "the farmer", "the veterinarian", "the rangers",
                  "the shepherd"],
        "thing": ["the dog", "a cat", "the horses", "the rabbit", "the elephant", "the lion",
                  "the puppies", "the cows", "a fox", "the owl", "the monkeys", "the sheep",
                  "the tiger", "the squirrel"],
        "place": ["the zoo", "the barn", "the forest", "the meadow", "the animal shelter",
                  "the jungle"],
        "verb": ["fed", "petted", "chased", "groomed", "adopted", "walked with", "watched"],
        "adj": ["furry", "wild", "playful", "hungry", "fluffy", "tame"],
    },
    "computing": {
        "agent": ["the programmers", "the engineer", "the developers", "the hacker",
                  "the database administrator"],
        "thing": ["the code", "the computer", "a program", "the server", "the database",
                  "the software", "the algorithm", "the keyboard", "the network",
                  "the compiler", "a bug", "the processor", "the website", "the laptop"],
        "place": ["the data center", "the office", "the terminal", "the server room",
                  "the laboratory", "the repository"],
        "verb": ["compiled", "debugged", "installed", "programmed", "deployed", "rebooted",
                 "optimized"],
        "adj": ["digital", "binary", "virtual", "encrypted", "online", "automated"],
    },
}

# General talk: no topic word appears here.
GENERAL_WORDS: dict[str, list[str]] = {
    "agent": ["my friend", "we", "everyone", "the neighbors", "my brother", "she", "he",
              "the children", "our family", "they"],
    "thing": ["the day", "the afternoon", "a long conversation", "the plan", "the weekend",
              "a quiet moment", "the idea", "the story", "the answer", "a good question"],
    "place": ["home", "the town", "the house", "the street", "the city", "the park"],
    "verb": ["talked about", "thought about", "remembered", "agreed on", "discussed",
             "forgot", "enjoyed"],
    "adj": ["quiet", "pleasant", "long", "strange", "ordinary", "happy"],
}

OPENERS = ["", "", "", "Then ", "Later that day, ", "In the morning, ", "After a while, ",
           "Yesterday ", "Today ", "Meanwhile, ", "Suddenly ", "Once again, ", "That evening, ",
           "Of course, ", "As usual, "]

# {agent} {verb} {thing} ... ; every template ends with a period.
TEMPLATES = [
    "{agent} {verb} {thing}.",
    "{agent} {verb} {thing} near {place}.",
    "{thing} was {adj} and {adj2}.",
    "{agent} said that {thing} was very {adj}.",
    "{agent} {verb} {thing} and {thing2}.",
    "everyone at {place} talked about {thing}.",
    "{agent} went to {place} to see {thing}.",
    "there was {adj} {thing_bare} at {place}.",
    "we saw {thing} and {thing2} at {place}.",
    "{agent} {verb} {thing} while {thing2} waited at {place}.",
    "it was a {adj} day at {place}.",
    "{agent} liked {thing} because it was {adj}.",
]

STAY = 0.75  # probability the next sentence keeps the current topic
GENERAL_SHARE = 0.35  # share of topic switches (and document starts) that go to general talk


def _bare(thing: str) -> str:
    for art in ("the ", "a ", "an "):
        if thing.startswith(art):
            return thing[len(art):]
    return thing


def sentence(topic: str, rng: random.Random) -> str:
    words = GENERAL_WORDS if topic == GENERAL else TOPICS[topic]
    t1, t2 = rng.sample(words["thing"], 2)
    a1, a2 = rng.sample(words["adj"], 2)
    s = rng.choice(TEMPLATES).format(
        agent=rng.choice(words["agent"]), verb=rng.choice(words["verb"]), thing=t1, thing2=t2,
        thing_bare=_bare(t1), place=rng.choice(words["place"]), adj=a1, adj2=a2,
    )
    s = rng.choice(OPENERS) + s
    return s[0].upper() + s[1:]


def _next_topic(rng: random.Random) -> str:
    if rng.random() < GENERAL_SHARE:
        return GENERAL
    return rng.choice(list(TOPICS))


def document(rng: random.Random, min_sentences: int = 3, max_sentences: int = 9) -> tuple[str, list[str]]:
    """One document and the topic of each of its sentences."""
    topic = _next_topic(rng)
    sents, labels = [], []
    for _ in range(rng.randint(min_sentences, max_sentences)):
        sents.append(sentence(topic, rng))
        labels.append(topic)
        if rng.random() > STAY:
            topic = _next_topic(rng)
    return " ".join(sents), labels


def documents(n: int, seed: int = 0) -> Iterator[tuple[str, list[str]]]:
    rng = random.Random(seed)
    for _ in range(n):
        yield document(rng)


def topic_words(topic: str) -> set[str]:
    """Every content word (lower case, no articles) of ``topic``'s vocabulary."""
    stop = {"the", "a", "an", "of", "at", "my", "on", "with", "for", "toward", "by",
            "along", "under", "near", "past", "across", "over", "through", "above", "side"}
    out = set()
    for group in TOPICS[topic].values():
        for phrase in group:
            out.update(w for w in phrase.lower().split() if w not in stop)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for text, labels in documents(args.docs, args.seed):
        print(f"[{', '.join(labels)}]\n{text}\n")


if __name__ == "__main__":
    main()
