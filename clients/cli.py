"""``steer``: command-line client.

    steer --target localhost:50051 generate --prompt "the ocean" --max-tokens 20 \
        --clamp resid_l1:12=8.0 --json

A feature is its flat index, or for a cross-layer transcoder ``LAYER/J`` (feature J of model
layer LAYER, as an attribution graph names it: ``--clamp topics_clt:1/19=6``), converted
to the flat index ``slot * features_per_layer + J`` with the SAE's ``ListSAEs`` entry
(``resolve_features``).

Values are passed through as typed; the server validates them, so every client gets the
same rules. On an RPC error the exit status is 1 and stderr shows the status code name
and the server's message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc

from clients.client import (
    ACT_DTYPES,
    ACT_POOLS,
    FINISH_NAMES,
    FeatureRef,
    LayerFeature,
    SteeringClient,
    ablate,
    activation_read,
    activations_of,
    add,
    clamp,
    collect,
    conditional,
    guardrail,
    inline_vector,
    parse_condition,
    parse_feature,
    parse_range,
    positions,
    read,
    scale,
    trained_json,
    vector,
)


def _edit(kind: str, with_value: bool):
    """argparse type for ``SAE:FEATURE=VALUE`` (or ``SAE:FEATURE`` without a value);
    ``FEATURE``: an index or a CLT's ``LAYER/J`` (``parse_feature``)."""

    def parse(text: str):
        head, eq, value = text.partition("=")
        if with_value and not eq:
            raise argparse.ArgumentTypeError(f"--{kind} {text!r}: expected SAE:FEATURE=VALUE")
        if not with_value and eq:
            raise argparse.ArgumentTypeError(f"--{kind} {text!r}: expected SAE:FEATURE")
        sae, colon, feature = head.rpartition(":")
        if not colon or not sae:
            raise argparse.ArgumentTypeError(f"--{kind} {text!r}: expected SAE:FEATURE")
        try:
            feat = parse_feature(feature)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"--{kind} {text!r}: {e}") from None
        try:
            val = float(value) if with_value else 0.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{kind} {text!r}: VALUE must be a number") from None
        return (kind, sae, feat, val)

    return parse


def _sae_int(flag: str):
    """argparse type for ``SAE:N``."""

    def parse(text: str):
        sae, colon, n = text.rpartition(":")
        if not colon or not sae:
            raise argparse.ArgumentTypeError(f"--{flag} {text!r}: expected SAE:N")
        try:
            v = int(n)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{flag} {text!r}: N must be an integer") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"--{flag} {text!r}: N must be >= 0")
        return sae, v

    return parse


def _sae_feature_ref(flag: str):
    """argparse type for ``SAE:FEATURE``, ``FEATURE`` an index or a CLT's ``LAYER/J``."""

    def parse(text: str) -> tuple[str, FeatureRef]:
        sae, colon, feature = text.rpartition(":")
        if not colon or not sae:
            raise argparse.ArgumentTypeError(f"--{flag} {text!r}: expected SAE:FEATURE")
        try:
            return sae, parse_feature(feature)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"--{flag} {text!r}: {e}") from None

    return parse


def _feature_ref(text: str) -> FeatureRef:
    """argparse type for a bare ``FEATURE`` (an index or a CLT's ``LAYER/J``)."""
    try:
        return parse_feature(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _range(text: str):
    """argparse type for a position range ``FRAME:START:END``."""
    try:
        return parse_range(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated token ids") from None


def selector_arg(ranges, exclude_ranges: bool, token_ids=(), exclude_token_ids: bool = False):
    """The PositionSelector the flags describe, or None when no position flag is given."""
    if not ranges and not token_ids and not exclude_ranges and not exclude_token_ids:
        return None
    return positions(*(ranges or ()), exclude_ranges=exclude_ranges, token_ids=token_ids or (),
                     exclude_token_ids=exclude_token_ids)


def reads_arg(topks, watches, scope: str | None, at=None):
    """Merge --read SAE:TOPK and --watch SAE:FEATURE into one FeatureRead per SAE (in order)."""
    order: list[str] = []
    k: dict[str, int] = {}
    w: dict[str, list[int]] = {}
    for sae, n in topks or ():
        order += [sae] if sae not in order else []
        k[sae] = n
    for sae, f in watches or ():
        order += [sae] if sae not in order else []
        w.setdefault(sae, []).append(f)
    return [read(sae, k.get(sae, 0), w.get(sae, ()), scope, at=at) for sae in order]


def _feature_json(f) -> dict:
    return {"position": f.position, "token_id": f.token_id, "sae": f.sae,
            "indices": list(f.indices), "values": list(f.values),
            "watch_values": list(f.watch_values)}


def _feature_line(f) -> str:
    tops = " ".join(f"{i}={v:.3g}" for i, v in zip(f.indices, f.values, strict=True))
    watch = (" watch " + " ".join(f"{v:.3g}" for v in f.watch_values)) if f.watch_values else ""
    return f"pos {f.position:>4} tok {f.token_id:>6}  {f.sae}: {tops}{watch}"


def _sae_feature(text: str) -> tuple[str, FeatureRef]:
    sae, colon, n = text.rpartition(":")
    try:
        index = parse_feature(n)
    except ValueError:
        index = -1
    if not colon or not sae or index == -1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SAE:INDEX, e.g. topics_l1:12 (or "
                                         "SAE:LAYER/J for a cross-layer transcoder)")
    return sae, index


def feature_json(f, *, full: bool = False) -> dict:
    """A feature record: sae, index, label, density, max_activation (+ details if ``full``)."""
    out = {"sae": f.sae, "index": f.index, "label": f.label, "density": f.density,
           "max_activation": f.max_activation, "mean_activation": f.mean_activation,
           "topic": f.topic, "score": f.score, "steer_value": f.steer_value,
           "steer_success": f.steer_success}
    if full:
        out.update(topic_selectivity=f.topic_selectivity, topic_coverage=f.topic_coverage,
                   dead=f.dead, top_tokens=list(f.top_tokens), topic_means=dict(f.topic_means),
                   site_norm=f.site_norm,
                   examples=[{"context": e.context, "token": e.token, "activation": e.activation}
                             for e in f.examples],
                   promoted=[{"token": t.token, "token_id": t.token_id, "logit": t.logit}
                             for t in f.promoted],
                   suppressed=[{"token": t.token, "token_id": t.token_id, "logit": t.logit}
                               for t in f.suppressed],
                   logit_effects_unavailable=f.logit_effects_unavailable)
    return out


def _features(client: SteeringClient, args) -> int:
    if args.features_command == "search":
        found = client.search_features(args.text, sae=args.sae, limit=args.limit)
        if args.json:
            print(json.dumps([feature_json(f) for f in found], indent=1))
            return 0
        if not found:
            print(f"no feature matches {args.text!r}", file=sys.stderr)
        for f in found:
            steer = f"  steer {f.steer_value:.4g} ({f.steer_success:.0%})" if f.steer_value else ""
            print(f"{f.sae}:{f.index:<6} {f.label:<48} density {f.density:.3g}  "
                  f"max {f.max_activation:.3g}  score {f.score:.3g}{steer}")
        return 0
    sae, index = args.feature
    f = client.get_feature(sae, index)
    if args.json:
        print(json.dumps(feature_json(f, full=True), indent=1))
        return 0
    print(f"{f.sae}:{f.index}  {f.label}")
    print(f"  density {f.density:.4g}  max {f.max_activation:.4g}  mean {f.mean_activation:.4g}"
          + (f"  (input norm at the site {f.site_norm:.4g})" if f.site_norm else ""))
    if f.topic:
        print(f"  topic {f.topic} (selectivity {f.topic_selectivity:.2f}, coverage {f.topic_coverage:.2f})")
    if f.steer_value:
        print(f"  steers: clamp to {f.steer_value:.4g} moved {f.steer_success:.0%} of neutral prompts to {f.topic}")
    if f.top_tokens:
        print("  top tokens: " + ", ".join(f.top_tokens))
    if f.promoted:
        print("  promotes: " + ", ".join(f"{t.token!r} {t.logit:+.3g}" for t in f.promoted[:8]))
        print("  suppresses: " + ", ".join(f"{t.token!r} {t.logit:+.3g}" for t in f.suppressed[:8]))
    elif f.logit_effects_unavailable:
        print(f"  no logit effects: {f.logit_effects_unavailable}")
    for e in f.examples:
        print(f"  {e.activation:7.3f}  ...{e.context}[[{e.token}]]")
    return 0


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids {text!r}: expected comma-separated integers") from None


def _message(text: str) -> tuple[str, str]:
    role, colon, content = text.partition(":")
    if not colon or not role.strip():
        raise argparse.ArgumentTypeError(f"--message {text!r}: expected ROLE:CONTENT, e.g. user:hello")
    return role.strip(), content.lstrip()


def _logprob_json(e) -> dict:
    def one(lp):
        return {"token_id": lp.token_id, "token": lp.token, "logprob": lp.logprob, "rank": lp.rank}

    return {**one(e.chosen), "top": [one(t) for t in e.top]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steer", description="Client for the SAE steering server.")
    p.add_argument("--target", default="localhost:50051", help="server HOST:PORT (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=None, help="RPC deadline in seconds")
    p.add_argument("--token", default=os.environ.get("STEER_TOKEN"),
                   help="bearer token (default: $STEER_TOKEN)")
    p.add_argument("--admin-token", default=os.environ.get("STEER_ADMIN_TOKEN"),
                   help="admin bearer token for vectors load/unload (default: $STEER_ADMIN_TOKEN)")
    p.add_argument("--tls-ca", default=None, help="PEM CA that signed the server cert (enables TLS)")
    p.add_argument("--tls-cert", default=None, help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", default=None, help="PEM client key (mutual TLS)")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text, optionally steered",
                       epilog="FEATURE: a feature index, or LAYER/J for feature J of layer LAYER "
                              "of a cross-layer transcoder (e.g. --clamp topics_clt:1/19=6)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", type=_ids, help="prompt token ids, e.g. 1,2,3")
    src.add_argument("--message", dest="messages", action="append", type=_message,
                     metavar="ROLE:CONTENT",
                     help="a chat message, rendered with the server's chat template (repeatable, "
                          "in order), e.g. --message 'user:Tell me about the sea'")
    g.add_argument("--max-tokens", type=int, default=None, help="tokens to generate (server default 16)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (server default 1.0)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--request-id", default="", help="id echoed back and logged by the server")
    g.add_argument("--generation-only", action="store_true",
                   help="apply the edits only at generated positions (default: every position)")
    g.add_argument("--positions", dest="positions", action="append", type=_range, default=None,
                   metavar="FRAME:START:END",
                   help="apply the edits only at these positions (repeatable, the union): "
                        "prompt:0:3 (first 3 prompt tokens), prompt:-1: (the last one), "
                        "gen::20 (first 20 generated), gen:4: (from the 5th generated on), "
                        "abs:5:9 (absolute positions 5..8); empty bounds = the frame's ends")
    g.add_argument("--exclude-ranges", action="store_true",
                   help="apply the edits everywhere except the --positions ranges")
    g.add_argument("--token-ids", type=_token_ids, default=None, metavar="ID,ID,...",
                   help="apply the edits only where the consumed token is one of these ids")
    g.add_argument("--exclude-token-ids", action="store_true",
                   help="apply the edits only where the consumed token is not one of --token-ids")
    for kind, with_value, meta, helptext in (
        ("clamp", True, "SAE:FEATURE=VALUE", "set a feature to VALUE"),
        ("ablate", False, "SAE:FEATURE", "set a feature to 0"),
        ("scale", True, "SAE:FEATURE=FACTOR", "multiply a feature by FACTOR"),
        ("add", True, "SAE:FEATURE=STRENGTH", "add STRENGTH x the feature's decoder direction"),
    ):
        g.add_argument(f"--{kind}", dest="edits", action="append", default=None,
                       type=_edit(kind, with_value), metavar=meta, help=f"{helptext} (repeatable)")
    g.add_argument("--when", type=condition_arg, default=None, metavar="SAE:FEATURE>T",
                   help="apply the edits only at positions where this feature of the edits' "
                        "SAE is > T (or < T with '<'), encoded from the same activation")
    g.add_argument("--latch", action="store_true",
                   help="with --when: once the condition has held, keep the edits on for the "
                        "rest of the request")
    g.add_argument("--vector", dest="vectors", action="append", type=vector_arg, default=None,
                   metavar="NAME=STRENGTH[@L,L,...]",
                   help="add the server's steering vector NAME times STRENGTH (at the given "
                        "layers only; the edit's --positions apply; repeatable)")
    g.add_argument("--inline-vector", dest="inline_vectors", action="append", type=_inline,
                   default=None, metavar="FILE.npy@L[=STRENGTH]",
                   help="add this request's own vector (a 1-D .npy of d_model floats) times "
                        "STRENGTH (default 1) to block L's output (a layer the server takes "
                        "inline vectors at; the edit's --positions apply; repeatable)")
    g.add_argument("--abort-when", dest="abort_when", action="append", type=condition_arg,
                   default=None, metavar="SAE:FEATURE>T",
                   help="guardrail: stop as soon as the feature crosses T at a generated "
                        "position (finish_reason 'feature'; repeatable)")
    g.add_argument("--abort-on-prompt", action="store_true",
                   help="guardrails also watch prompt positions (refuse before generating)")
    g.add_argument("--read", dest="read_topk", action="append", type=_sae_int("read"),
                   metavar="SAE:TOPK", help="stream the TOPK strongest features of SAE per position")
    g.add_argument("--watch", dest="watch", action="append", type=_sae_feature_ref("watch"),
                   metavar="SAE:FEATURE", help="always report this feature per position (repeatable)")
    g.add_argument("--read-scope", choices=["all", "prompt", "generation"], default=None,
                   help="positions to read (default: all)")
    g.add_argument("--read-positions", action="append", type=_range, default=None,
                   metavar="FRAME:START:END",
                   help="read only these positions (repeatable; syntax as --positions)")
    g.add_argument("--read-exclude-ranges", action="store_true",
                   help="read every position except the --read-positions ranges")
    g.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="report each generated token's logprob and its N most likely alternatives")
    g.add_argument("--prompt-logprobs", type=int, default=None, metavar="N",
                   help="report the prompt tokens' logprobs with N alternatives (JSON only)")
    _activation_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object when done")

    e = sub.add_parser("encode", help="per-token and pooled feature activations of a prompt")
    esrc = e.add_mutually_exclusive_group(required=True)
    esrc.add_argument("--prompt", help="prompt text")
    esrc.add_argument("--prompt-ids", type=_ids, help="prompt token ids, e.g. 1,2,3")
    e.add_argument("--sae", help="SAE id (needed unless --activations is given)")
    e.add_argument("--top-k", type=int, default=0, help="strongest features per position")
    e.add_argument("--watch", dest="watch_features", action="append", type=_feature_ref,
                   default=[],
                   metavar="FEATURE", help="feature always reported (repeatable; LAYER/J for a "
                                           "cross-layer transcoder)")
    _activation_args(e)
    e.add_argument("--json", action="store_true", help="print one JSON object")

    fp = sub.add_parser("features", help="look up labelled features")
    fsub = fp.add_subparsers(dest="features_command", required=True)
    fs = fsub.add_parser("search", help="find features whose label contains every word of TEXT")
    fs.add_argument("text", metavar="TEXT", help="words to search for, e.g. ocean")
    fs.add_argument("--sae", default="", help="only this SAE (default: every labelled SAE)")
    fs.add_argument("--limit", type=int, default=0, help="most results (server default 10, max 100)")
    fs.add_argument("--json", action="store_true", help="print a JSON list, best match first")
    fshow = fsub.add_parser("show", help="one feature's label, statistics and examples")
    fshow.add_argument("feature", type=_sae_feature, metavar="SAE:INDEX",
                       help="e.g. topics_l1:12, or topics_clt:1/19 (a cross-layer transcoder's "
                            "feature 19 of layer 1)")
    fshow.add_argument("--json", action="store_true", help="print one JSON object")

    sub.add_parser("saes", help="list the server's SAEs (JSON)")
    sub.add_parser("info", help="describe the served model (JSON)")

    vp = sub.add_parser("vectors", help="list, load, unload, save and train steering vectors")
    vsub = vp.add_subparsers(dest="vectors_command", required=True)
    vsub.add_parser("list", help="the vectors requests may name (JSON)")
    vl = vsub.add_parser("load", help="load a vector at run time (admin; --admin-token)")
    vl.add_argument("name")
    vsrc = vl.add_mutually_exclusive_group(required=True)
    vsrc.add_argument("--file", help="a control-vector GGUF or a safetensors file")
    vsrc.add_argument("--values-json", metavar="FILE",
                      help='JSON {"<block>": [d_model floats], ...} (or {"vectors": {...}}, as '
                           "steer vectors train --json prints it)")
    vl.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                    help="text kept with the vector; repeat for several")
    vu = vsub.add_parser("unload", help="unload a runtime-loaded vector (admin; --admin-token)")
    vu.add_argument("name")
    vt = vsub.add_parser("train", help="fit a vector from contrastive prompts on the server's "
                                       "activations (--register: admin; --admin-token)")
    vt.add_argument("name")
    vt.add_argument("--positive", required=True, metavar="FILE",
                    help="prompts showing the behaviour, one per line")
    vt.add_argument("--negative", required=True, metavar="FILE",
                    help="prompts showing its opposite, one per line (pca: line i pairs with "
                         "--positive's line i)")
    vt.add_argument("--layers", required=True, type=_int_list, metavar="L,L",
                    help="blocks whose output (blocks.L.hook_resid_post) the vector is read at "
                         "and added to; each must be a declared --activation-hooks site")
    vt.add_argument("--method", choices=("mean_diff", "pca"), default="mean_diff",
                    help="mean_diff: CAA's mean difference; pca: repeng's first principal "
                         "component of the paired differences (default: mean_diff)")
    vt.add_argument("--position", choices=("last", "mean"), default="last",
                    help="each prompt's last token's activation, or the mean over its tokens")
    vt.add_argument("--normalize", action="store_true", help="scale mean_diff vectors to unit norm")
    vt.add_argument("--register", action="store_true",
                    help="load it as a runtime vector NAME (admin) so requests can name it")
    vt.add_argument("--save", metavar="OUT.gguf",
                    help="write it as a self-describing GGUF (needs --register: the server "
                         "writes it)")
    vt.add_argument("--json", action="store_true",
                    help='print {"name", "vectors": {"<layer>": [floats]}, "stats": {...}}')
    vs = vsub.add_parser("save", help="save a vector the server holds as a self-describing GGUF "
                                      "(llama.cpp control vector with model, width, hooks, date)")
    vs.add_argument("name")
    vs.add_argument("out", help="the .gguf file to write")
    return p


def _activation_args(p) -> None:
    p.add_argument("--activations", action="append", default=[], metavar="HOOK",
                   help="return the raw activation at HOOK (a site the server declares with "
                        "--activation-hooks, e.g. blocks.1.hook_resid_post), taken after this "
                        "request's edits; repeatable")
    p.add_argument("--activations-before-edits", action="append", default=[], metavar="HOOK",
                   help="return the raw activation at HOOK taken before this request's edits "
                        "at that site (still after its edits at earlier sites); repeatable, "
                        "and a HOOK may also be given to --activations (the server must edit "
                        "there: steer info lists them as activation_hooks_with_edits); "
                        "printed as HOOK@before, in --json with \"before_edits\": true; "
                        "--activations-pool and --activations-dtype apply to these too")
    p.add_argument("--activations-pool", choices=sorted(ACT_POOLS), default="none",
                   help="one row pooled over the positions instead of one per position")
    p.add_argument("--activations-dtype", choices=sorted(ACT_DTYPES), default="f32",
                   help="element type on the wire (the printed values are its float values)")


def activation_reads_arg(args) -> list:
    """``--activations`` (after edits), then ``--activations-before-edits``."""
    return [activation_read(h, pool=args.activations_pool, dtype=args.activations_dtype,
                            before_edits=before)
            for before, hooks in ((False, args.activations),
                                  (True, args.activations_before_edits))
            for h in hooks]


def _activation_entries(msgs):
    """``(hook, before_edits, values [rows, d], positions)`` per read: the reads after
    edits, then those before."""
    for before in (False, True):
        values, positions = activations_of(msgs, before_edits=before)
        for h, v in values.items():
            yield h, before, v, positions[h]


def _activations_json(msgs) -> list[dict]:
    """``"activations"``: one entry per read, ``positions`` and ``values`` row by row; a
    ``--activations-before-edits`` read has ``"before_edits": true``."""
    return [{"hook": h, "positions": pos, "values": v.tolist(),
             **({"before_edits": True} if before else {})}
            for h, before, v, pos in _activation_entries(msgs)]


def _activation_lines(msgs) -> list[str]:
    return [f"activations {h}{'@before' if before else ''}: {v.shape[0]} x {v.shape[1]} "
            f"at positions {pos}" for h, before, v, pos in _activation_entries(msgs)]


class _LayerCondition(str):
    """A ``--when`` / ``--abort-when`` text that names a CLT feature as ``LAYER/J``: parsed
    again once the client knows the SAE's layers (``resolve_features``)."""


def condition_arg(text: str):
    layered: list[LayerFeature] = []

    def note(_sae: str, feature) -> int:
        layered.append(feature)
        return 0

    try:
        cond = parse_condition(text, resolve=note)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return _LayerCondition(text) if layered else cond


def resolve_features(client: SteeringClient, args) -> None:
    """Replace every ``LAYER/J`` feature of ``args`` (edits, ``--watch``, ``--when``,
    ``--abort-when``, ``encode --watch``, ``features show``) with its flat index
    (``SteeringClient.flat_feature``: one ``ListSAEs`` when any is given). Raises
    ``ValueError`` naming the flag when a feature does not resolve."""

    def flat(flag: str, sae: str, f: FeatureRef) -> int:
        try:
            return client.flat_feature(sae, f)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None

    def cond(flag: str, c):
        if not isinstance(c, _LayerCondition):
            return c
        return parse_condition(str(c), resolve=lambda sae, f: flat(flag, sae, f))

    if getattr(args, "edits", None):
        args.edits = [(k, sae, flat(f"--{k}", sae, f), v) for k, sae, f, v in args.edits]
    if getattr(args, "watch", None):
        args.watch = [(sae, flat("--watch", sae, f)) for sae, f in args.watch]
    if getattr(args, "when", None) is not None:
        args.when = cond("--when", args.when)
    if getattr(args, "abort_when", None):
        args.abort_when = [cond("--abort-when", c) for c in args.abort_when]
    if getattr(args, "watch_features", None):
        if any(isinstance(f, LayerFeature) for f in args.watch_features) and not args.sae:
            raise ValueError("--watch LAYER/J needs --sae (the cross-layer transcoder)")
        args.watch_features = [flat("--watch", args.sae, f) for f in args.watch_features]
    if getattr(args, "feature", None) is not None:
        sae, f = args.feature
        args.feature = (sae, flat("feature", sae, f))


def interventions_arg(edits, scope: str | None, at=None, cond=None, latch: bool = False):
    makers = {
        "clamp": lambda s, f, v: clamp(s, f, v, scope, at=at),
        "ablate": lambda s, f, v: ablate(s, f, scope, at=at),
        "scale": lambda s, f, v: scale(s, f, v, scope, at=at),
        "add": lambda s, f, v: add(s, f, v, scope, at=at),
    }
    out = [makers[kind](sae, feat, val) for kind, sae, feat, val in edits or ()]
    if cond is not None:
        out = [conditional(iv, cond, latch=latch) for iv in out]
    return out


def _int_list(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected L,L,... (block numbers), got {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("give at least one block")
    return out


def vector_arg(text: str):
    name, sep, rest = text.partition("=")
    strength, _, layers = rest.partition("@")
    try:
        return name, float(strength), [int(x) for x in layers.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected NAME=STRENGTH[@L,L,...], got {text!r}") from None


def _inline(text: str):
    import numpy as np

    path, _, rest = text.rpartition("@")
    layer, _, strength = rest.partition("=")
    try:
        layer_n, st = int(layer), float(strength) if strength else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FILE.npy@L[=STRENGTH], got {text!r}") from None
    if not path:
        raise argparse.ArgumentTypeError(f"expected FILE.npy@L[=STRENGTH], got {text!r}")
    try:
        values = np.load(path)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{path}: cannot read a .npy array ({e})") from None
    if values.ndim != 1:
        raise argparse.ArgumentTypeError(f"{path}: a 1-D array of d_model floats is needed, got "
                                         f"shape {values.shape}")
    return values.astype(float).tolist(), layer_n, st


def guards_arg(conds, on_prompt: bool):
    every = positions() if on_prompt else None  # an empty selector: every position
    return [guardrail(c, at=every) for c in conds or ()]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with SteeringClient(args.target, timeout=args.timeout, token=args.token, tls_ca=args.tls_ca,
                            tls_cert=args.tls_cert, tls_key=args.tls_key,
                            admin_token=args.admin_token) as client:
            try:
                resolve_features(client, args)
            except ValueError as e:
                print(f"steer: {e}", file=sys.stderr)
                return 2
            if args.command == "generate":
                return _generate(client, args)
            if args.command == "encode":
                return _encode(client, args)
            if args.command == "features":
                return _features(client, args)
            if args.command == "vectors":
                return _vectors(client, args)
            if args.command == "saes":
                from google.protobuf.json_format import MessageToDict

                print(json.dumps([MessageToDict(s, preserving_proto_field_name=True)
                                  for s in client.list_saes()], indent=1))
            elif args.command == "info":
                from google.protobuf.json_format import MessageToDict

                print(json.dumps(MessageToDict(client.model_info(), preserving_proto_field_name=True), indent=1))
    except grpc.RpcError as e:
        print(f"steer: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


def _generate(client: SteeringClient, args) -> int:
    prompt = args.prompt if args.prompt is not None else args.prompt_ids
    stream = client.generate(
        args.messages if args.messages else prompt,
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=args.stop, request_id=args.request_id,
        interventions=interventions_arg(
            args.edits, "generation_only" if args.generation_only else None,
            selector_arg(args.positions, args.exclude_ranges, args.token_ids, args.exclude_token_ids),
            args.when, args.latch),
        reads=reads_arg(args.read_topk, args.watch, args.read_scope,
                     selector_arg(args.read_positions, args.read_exclude_ranges)),
        logprobs=args.logprobs, prompt_logprobs=args.prompt_logprobs,
        abort_when=guards_arg(args.abort_when, args.abort_on_prompt),
        vectors=[vector(n, st, ls, at=selector_arg(args.positions, args.exclude_ranges,
                                                 args.token_ids, args.exclude_token_ids))
                 for n, st, ls in args.vectors or ()],
        inline_vectors=[inline_vector(vals, layer, st, at=selector_arg(
            args.positions, args.exclude_ranges, args.token_ids, args.exclude_token_ids))
            for vals, layer, st in args.inline_vectors or ()],
        activation_reads=activation_reads_arg(args),
    )
    acts: list = []
    if args.json:
        stream = _keep_activations(stream, acts)
        r = collect(stream)
        out = {
            "request_id": r.request_id, "text": r.text, "token_ids": r.token_ids,
            "prompt_token_ids": r.prompt_token_ids, "finish_reason": r.finish_reason,
        }
        if r.guardrail is not None:
            out["guardrail"] = _trip_json(r.guardrail)
        if r.features:
            out["features"] = [_feature_json(f) for f in r.features]
        if args.logprobs is not None:
            out["logprobs"] = [_logprob_json(e) for e in r.logprobs]
        if args.prompt_logprobs is not None:
            out["prompt_logprobs"] = [_logprob_json(e) for e in r.prompt_logprobs]
        if args.activations or args.activations_before_edits:
            out["activations"] = _activations_json(acts)
        print(json.dumps(out))
        return 0
    finish = None
    trip = None
    text = []
    logprob_lines = []
    for msg in stream:
        acts.extend(msg.activations)
        if msg.HasField("guardrail"):
            trip = msg.guardrail
        logprob_lines += [_logprob_line(e) for e in msg.logprobs]
        if msg.features:  # one line per position and SAE, then the text at the end
            for f in msg.features:
                print(_feature_line(f))
            text.append(msg.text)
        else:
            sys.stdout.write(msg.text)
            sys.stdout.flush()
            text.append(msg.text)
        finish = FINISH_NAMES.get(msg.finish_reason) or finish
    if args.read_topk or args.watch:
        print("text: " + "".join(text))
    else:
        sys.stdout.write("\n")
    for line in logprob_lines:  # after the text, one line per generated token
        print(line)
    for line in _activation_lines(acts):
        print(line)
    if trip is not None:
        print(f"[guardrail {trip.guardrail}: {trip.sae}:{trip.feature} = {trip.value:.4g} at "
              f"position {trip.position}]", file=sys.stderr)
    print(f"[finish: {finish}]", file=sys.stderr)
    return 0


def _keep_activations(stream, acts: list):
    for msg in stream:
        acts.extend(msg.activations)
        yield msg


def _vector_json(v) -> dict:
    return {"name": v.name, "layers": list(v.layers), "runtime": v.runtime,
            "metadata": dict(v.metadata)}


def _values_json(path: str) -> dict[int, list[float]]:
    try:
        with open(path) as fh:
            obj = json.load(fh)
    except (OSError, ValueError) as e:
        raise SystemExit(f"steer: {path}: cannot read JSON ({e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("vectors"), dict):
        obj = obj["vectors"]
    try:
        return {int(k): [float(x) for x in v] for k, v in obj.items()}
    except (AttributeError, TypeError, ValueError):
        raise SystemExit(f'steer: {path}: expected {{"<block>": [floats], ...}}') from None


def _vectors(client: SteeringClient, args) -> int:
    if args.vectors_command == "list":
        print(json.dumps([_vector_json(v) for v in client.list_vectors()], indent=1))
    elif args.vectors_command == "load":
        meta = {}
        for kv in args.metadata:
            k, sep, v = kv.partition("=")
            if not sep or not k:
                raise SystemExit(f"steer: --metadata {kv!r}: expected KEY=VALUE")
            meta[k] = v
        if args.file is not None:
            try:
                v = client.load_vector(args.name, file=args.file, metadata=meta)
            except OSError as e:
                raise SystemExit(f"steer: --file {args.file}: {e}") from None
        else:
            v = client.load_vector(args.name, _values_json(args.values_json), metadata=meta)
        print(json.dumps(_vector_json(v)))
    elif args.vectors_command == "train":
        return _train(client, args)
    elif args.vectors_command == "save":
        data = client.export_vector(args.name)
        with open(args.out, "wb") as fh:
            fh.write(data)
        print(json.dumps({"name": args.name, "file": args.out, "bytes": len(data)}))
    else:
        print(json.dumps(_vector_json(client.unload_vector(args.name))))
    return 0


def _prompt_lines(path: str, flag: str) -> list[str]:
    try:
        with open(path) as fh:
            lines = [ln.rstrip("\n") for ln in fh if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"steer: {flag} {path}: {e}") from None
    if not lines:
        raise SystemExit(f"steer: {flag} {path}: no prompt (one per line)")
    return lines


def _train(client: SteeringClient, args) -> int:
    if args.save and not args.register:
        raise SystemExit("steer: --save needs --register (the server writes the GGUF of a "
                         "vector it holds)")
    r = client.train_vector(args.name, _prompt_lines(args.positive, "--positive"),
                            _prompt_lines(args.negative, "--negative"), args.layers,
                            method=args.method, position=args.position,
                            normalize=args.normalize, register=args.register)
    out = trained_json(r)
    if args.save:
        data = client.export_vector(args.name)
        with open(args.save, "wb") as fh:
            fh.write(data)
        out["file"] = args.save
    if args.json:
        print(json.dumps(out))
        return 0
    for layer, st in out["stats"].items():
        held = st["held_out_accuracy"]
        print(f"layer {layer}: positives {st['mean_positive']:.4g}, negatives "
              f"{st['mean_negative']:.4g}, accuracy {st['accuracy']:.3f}, held-out "
              + (f"{held:.3f} ({st['held_out']} prompts)" if held is not None else "none"))
    if out["vector"] is not None:
        print(f"registered {args.name!r} at blocks {out['vector']['layers']}")
    if args.save:
        print(f"wrote {args.save}")
    return 0


def _trip_json(t) -> dict:
    return {"guardrail": t.guardrail, "sae": t.sae, "feature": t.feature,
            "position": t.position, "value": t.value}


def _logprob_line(e) -> str:
    top = " ".join(f"{t.token!r}={t.logprob:.3f}" for t in e.top)
    return f"{e.chosen.token!r:>14} {e.chosen.logprob:8.4f} rank {e.chosen.rank:<4} {top}"


def _encode(client: SteeringClient, args) -> int:
    prompt = args.prompt if args.prompt is not None else args.prompt_ids
    if not args.sae and not args.activations and not args.activations_before_edits:
        print("steer encode: give --sae or --activations", file=sys.stderr)
        return 2
    reads = [read(args.sae, args.top_k, args.watch_features, "prompt")] if args.sae else []
    (res,) = client.encode([prompt], reads, activation_reads_arg(args))
    pooled = [{"sae": p.sae, "features": [{"index": f.index, "max": f.max, "mean": f.mean}
                                          for f in p.features]} for p in res.pooled]
    if args.json:
        out = {"token_ids": list(res.token_ids),
               "features": [_feature_json(f) for f in res.features], "pooled": pooled}
        if args.activations or args.activations_before_edits:
            out["activations"] = _activations_json(res.activations)
        print(json.dumps(out))
        return 0
    for line in _activation_lines(res.activations):
        print(line)
    for f in res.features:
        print(_feature_line(f))
    for p in pooled:
        print(f"pooled {p['sae']}: " + " ".join(
            f"{f['index']}(max {f['max']:.3g}, mean {f['mean']:.3g})" for f in p["features"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
