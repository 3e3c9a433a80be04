"""``steerd labels``: build feature labels for any SAE, or import Neuronpedia's.

    steerd labels build --model M --sae S --corpus FILE.txt [--tokens N] [--out PATH]
    steerd labels import-neuronpedia FILE [FILE ...] (--sae-dir DIR | --out PATH [--d-sae N])

Both write ``feature_labels.json`` (schema in ``sae_runtime.labels.store``) beside the SAE unless
``--out`` says otherwise; the server loads it at startup.

Neuronpedia explanations come as a JSON list (the old ``/api/explanation/export``) or JSON
Lines, optionally gzipped (the ``neuronpedia-datasets`` S3 export,
``v1/<modelId>/<saeId>/explanations/batch-N.jsonl.gz``), of objects with at least ``index``
(a string or an int) and ``description``, and usually ``modelId``, ``layer`` (the SAE id,
e.g. ``"6-res-jb"``) and ``explanationModelName``. A feature with several explanations gets
the first non-empty one (``--prefer-explainer`` picks one explainer's where it has one).
Imported into an existing labels file, the statistics stay and the labels are replaced.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from sae_runtime.errors import SteeringError
from sae_runtime.labels import store as feats


class NeuronpediaImportError(SteeringError):
    """A Neuronpedia export that cannot be imported (named after the file and record)."""


def add_parser(sub) -> None:
    labels = sub.add_parser("labels", help="build or import feature labels for an SAE",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    lsub = labels.add_subparsers(dest="labels_command", required=True)
    b = lsub.add_parser("build", help="feature statistics, logit effects and automatic labels "
                        "from a text corpus (plain torch, CPU)")
    b.add_argument("--model", type=Path, required=True, help="Hugging Face model directory")
    b.add_argument("--sae", type=Path, required=True, metavar="DIR[@HOOK]",
                   help="SAE directory (any supported format); @HOOK overrides its hook name")
    b.add_argument("--corpus", type=Path, required=True, help="UTF-8 text file")
    b.add_argument("--tokens", type=int, default=200_000, help="corpus tokens to read (default: 200000)")
    b.add_argument("--context", type=int, default=128, help="tokens per context (default: 128)")
    b.add_argument("--batch", type=int, default=8, help="contexts per forward pass (default: 8)")
    b.add_argument("--examples", type=int, default=10, help="top examples per feature (default: 10)")
    b.add_argument("--top-tokens", type=int, default=10, help="top tokens per feature (default: 10)")
    b.add_argument("--logits", type=int, default=10,
                   help="promoted/suppressed tokens per feature, 0 = none (default: 10)")
    b.add_argument("--checkpoint-every", type=int, default=64,
                   help="contexts between checkpoints to <out>.partial (default: 64)")
    b.add_argument("--out", type=Path, default=None, help="output file (default: <sae>/feature_labels.json)")
    b.add_argument("--restart", action="store_true", help="discard a checkpoint and start over")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: interrupt
    n = lsub.add_parser("import-neuronpedia", help="convert a Neuronpedia explanations export")
    n.add_argument("files", type=Path, nargs="+", metavar="FILE",
                   help="export: .json list, .jsonl or .jsonl.gz (several batch files allowed)")
    where = n.add_mutually_exclusive_group(required=True)
    where.add_argument("--sae-dir", type=Path, help="write DIR/feature_labels.json (d_sae from the SAE)")
    where.add_argument("--out", type=Path, help="write this file")
    n.add_argument("--d-sae", type=int, default=None,
                   help="number of features (needed with --out unless the file exists)")
    n.add_argument("--layer", default=None,
                   help="keep only records of this Neuronpedia SAE id (e.g. 6-res-jb); needed when "
                        "the export mixes several")
    n.add_argument("--prefer-explainer", default=None, metavar="NAME",
                   help="use this explanationModelName's description where a feature has one")


def main(args: argparse.Namespace) -> int:
    try:
        if args.labels_command == "build":
            return _build(args)
        return _import(args)
    except SteeringError as e:
        print(f"steerd labels: error: {e}", file=sys.stderr)
        return 2


def _build(args: argparse.Namespace) -> int:
    from sae_runtime.labels.build import BuildConfig, build

    sae, at, hook = str(args.sae).partition("@")
    cfg = BuildConfig(model=args.model, sae=Path(sae), corpus=args.corpus, hook_name=hook if at else None,
                      tokens=args.tokens, context=args.context, batch=args.batch,
                      n_examples=args.examples, n_top_tokens=args.top_tokens, n_logits=args.logits,
                      checkpoint_every=args.checkpoint_every, out=args.out)
    try:
        out = build(cfg, restart=args.restart, progress=not args.no_progress, stop_after=args.stop_after)
    except KeyboardInterrupt:
        print(f"\nsteerd labels: interrupted; rerun the same command to resume from "
              f"{cfg.partial_path}", file=sys.stderr)
        return 130
    if out is None:
        print(f"steerd labels: stopped; checkpoint in {cfg.partial_path}", file=sys.stderr)
        return 0
    doc = json.loads(out.read_text())
    print(f"wrote {out}: {len(doc['features'])} live features, {len(doc['dead_features'])} dead, "
          f"{doc['labelling_tokens']} tokens")
    if doc.get("logit_effects_unavailable"):
        print(f"no logit effects: {doc['logit_effects_unavailable']}")
    return 0


# --------------------------------------------------------------------------- import


def read_export(path: Path) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` for each object of a Neuronpedia export file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise NeuronpediaImportError(f"{path}: cannot read: {e}") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except ValueError as e:
            raise NeuronpediaImportError(f"{path}: not valid JSON: {e}") from None
        for n, rec in enumerate(items):
            yield f"{path}: record {n}", rec
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise NeuronpediaImportError(f"{path}: line {n}: not valid JSON: {e}") from None
        yield f"{path}: line {n}", rec


def collect(files: list[Path], d_sae: int, layer: str | None = None,
            prefer: str | None = None) -> tuple[dict[int, dict], dict]:
    """``{index: {"label", "label_source"}}`` and counts from the export files."""
    chosen: dict[int, dict] = {}
    layers: set[str] = set()
    counts = {"records": 0, "skipped_empty": 0, "skipped_layer": 0, "duplicates": 0}
    for path in files:
        for where, rec in read_export(path):
            if not isinstance(rec, dict):
                raise NeuronpediaImportError(f"{where}: expected an object, got {type(rec).__name__}")
            counts["records"] += 1
            rec_layer = rec.get("layer")
            if layer is not None and rec_layer is not None and str(rec_layer) != layer:
                counts["skipped_layer"] += 1
                continue
            if rec_layer is not None:
                layers.add(str(rec_layer))
            if "index" not in rec:
                raise NeuronpediaImportError(f"{where}: no \"index\" field")
            try:
                index = int(str(rec["index"]).strip())
            except ValueError:
                raise NeuronpediaImportError(f"{where}: index {rec['index']!r} is not an integer") from None
            if not 0 <= index < d_sae:
                raise NeuronpediaImportError(f"{where}: index {index} is out of range for d_sae={d_sae} "
                                   f"(is the export for this SAE?)")
            desc = rec.get("description")
            if desc is None:
                raise NeuronpediaImportError(f"{where}: no \"description\" field")
            if not isinstance(desc, str):
                raise NeuronpediaImportError(f"{where}: description must be a string")
            desc = desc.strip()
            if not desc:
                counts["skipped_empty"] += 1
                continue
            explainer = str(rec.get("explanationModelName") or "")
            src = "neuronpedia" + (f":{rec.get('modelId')}/{rec_layer}" if rec.get("modelId") else "")
            entry = {"label": desc, "label_source": src + (f" ({explainer})" if explainer else "")}
            if index in chosen:
                counts["duplicates"] += 1
                if prefer and explainer == prefer and chosen[index]["_explainer"] != prefer:
                    chosen[index] = {**entry, "_explainer": explainer}
                continue
            chosen[index] = {**entry, "_explainer": explainer}
    if layer is None and len(layers) > 1:
        raise NeuronpediaImportError(f"the export mixes several SAEs (layer values: {', '.join(sorted(layers))}); "
                           f"pass --layer to pick one")
    for v in chosen.values():
        v.pop("_explainer")
    return chosen, counts


def import_neuronpedia(files: list[Path], out: Path, d_sae: int | None = None,
                       layer: str | None = None, prefer: str | None = None) -> tuple[Path, dict]:
    """Write (or merge into) the labels file ``out``; returns it and the counts."""
    existing = None
    if out.is_file():
        try:
            existing = json.loads(out.read_text())
        except (OSError, ValueError) as e:
            raise NeuronpediaImportError(f"{out}: cannot read the existing labels file: {e}") from None
        if not isinstance(existing, dict) or existing.get("format") != feats.FORMAT:
            raise NeuronpediaImportError(f"{out}: exists but is not a feature-label file; move it away first")
        if d_sae is not None and existing.get("d_sae", d_sae) != d_sae:
            raise NeuronpediaImportError(f"{out}: is for d_sae={existing['d_sae']}, but --d-sae/the SAE says {d_sae}")
        d_sae = existing.get("d_sae", d_sae)
    if d_sae is None:
        raise NeuronpediaImportError("--d-sae: give the SAE's number of features (no SAE dir and no existing file)")
    if d_sae < 1:
        raise NeuronpediaImportError(f"--d-sae: must be positive, got {d_sae}")
    chosen, counts = collect(files, d_sae, layer, prefer)
    doc = existing or {"format": feats.FORMAT, "d_sae": d_sae,
                       "method": "imported from a Neuronpedia explanations export", "features": []}
    by_index = {rec["index"]: rec for rec in doc.get("features", [])}
    replaced = 0
    for index, entry in chosen.items():
        if index in by_index:
            replaced += 1
            by_index[index].update(entry)
        else:
            by_index[index] = {"index": index, **entry}
    doc["d_sae"] = d_sae
    doc["features"] = [by_index[i] for i in sorted(by_index)]
    counts.update(imported=len(chosen), replaced=replaced, added=len(chosen) - replaced)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, ensure_ascii=False, separators=(",", ":")))
    os.replace(tmp, out)
    feats.FeatureLabels.load(out, "check", d_sae)  # what we wrote loads
    return out, counts


def _import(args: argparse.Namespace) -> int:
    d_sae = args.d_sae
    if args.sae_dir is not None:
        from sae_runtime.loading import load_sae_config

        cfg = load_sae_config(args.sae_dir)
        if d_sae is not None and d_sae != cfg.d_sae:
            raise NeuronpediaImportError(f"--d-sae {d_sae} differs from the SAE in {args.sae_dir} (d_sae={cfg.d_sae})")
        d_sae = cfg.d_sae
        out = args.sae_dir / feats.LABELS_FILE
    else:
        out = args.out
    out, c = import_neuronpedia(args.files, out, d_sae, args.layer, args.prefer_explainer)
    print(f"wrote {out}: {c['imported']} labels imported ({c['replaced']} replaced, {c['added']} added) "
          f"from {c['records']} records; skipped {c['skipped_empty']} empty, {c['skipped_layer']} of "
          f"other layers, {c['duplicates']} duplicates")
    return 0
