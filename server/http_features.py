"""HTTP JSON for SAEs and feature labels, and the browser playground (``server/playground/``).

Routes added to the OpenAI-compatible app (``server.openai_api.build_app``):

- ``GET /v1/saes``: the loaded SAEs (the gRPC ``ListSAEs`` entries), each with ``labelled``;
- ``GET /v1/features/search?q=&sae=&limit=``: ``SearchFeatures`` (best match first);
- ``GET /v1/features/{sae}/{index}``: ``GetFeature``;
- ``POST /v1/token_pieces`` with ``{"token_ids": [...]}``: each id decoded on its own, so a
  page can label per-position reads (``{"pieces": [...]}``);
- ``GET /`` and ``GET /playground/...``: the playground's static files, served without auth
  (they hold no data; the page sends its bearer token to the JSON routes).

The JSON routes call the servicer's own logic (``server.convert``) and turn the proto into
JSON with ``MessageToDict`` (proto field names, zeros included), so a field added to the
proto shows up here unchanged. They follow the server's auth setting and answer errors
OpenAI-shaped through ``openai_api``'s helpers; ``param`` names the query or path parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from sae_runtime.errors import InvalidRequestError, SteeringError
from server import convert
from server.openai_api import U32, HttpError, _from_steering
from steering.v1 import steering_pb2 as pb

PLAYGROUND_DIR = Path(__file__).with_name("playground")
SEARCH_PARAMS = ("q", "sae", "limit")


def proto_json(msg: Message) -> dict:
    """A proto as JSON: proto field names, fields at their default value included."""
    return MessageToDict(msg, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True)


def _int_param(name: str, raw: str, lo: int, hi: int) -> int:
    if not raw.isdigit() or not lo <= int(raw) < hi:
        raise InvalidRequestError(name, f"must be an integer in [{lo}, {hi}), got {raw!r}")
    return int(raw)


def feature_routes(servicer, *, authorized: Callable[[Request], bool],
                   fail: Callable[[HttpError, str], Response],
                   unauthorized: Callable[[], HttpError]) -> list[BaseRoute]:
    """The routes above. ``authorized``, ``fail`` and ``unauthorized`` are the app's own
    (``build_app``), so auth, error bodies and request metrics match the other routes."""

    def json_route(path: str, fn: Callable, methods: tuple[str, ...] = ("GET",)) -> Route:
        # ``path`` (the template, not the URL) labels the metrics: bounded cardinality
        async def endpoint(request: Request) -> Response:
            if not authorized(request):
                return fail(unauthorized(), path)
            try:
                out = await fn(request)
            except HttpError as e:
                return fail(e, path)
            except SteeringError as e:
                return fail(_from_steering(e, chat=False, body=None), path)
            servicer.metrics.requests.labels(path, "OK").inc()
            return JSONResponse(out)

        return Route(path, endpoint, methods=list(methods))

    async def list_saes(request: Request) -> dict:
        data = []
        for sid, cfg in servicer.saes.items():
            info = proto_json(convert.sae_info_to_pb(sid, cfg, servicer.sae_dtypes.get(sid, "")))
            data.append({**info, "labelled": sid in servicer.labels})
        return {"object": "list", "data": data}

    async def search(request: Request) -> dict:
        params = request.query_params
        for name in params:
            if name not in SEARCH_PARAMS:
                raise InvalidRequestError(name, f"unknown parameter (known: {', '.join(SEARCH_PARAMS)})")
        limit = params.get("limit", "")
        req = pb.SearchFeaturesRequest(query=params.get("q", ""), sae=params.get("sae", ""),
                                       limit=_int_param("limit", limit, 1, U32) if limit else 0)
        try:
            found = convert.search_features(req, servicer.saes, servicer.labels)
        except InvalidRequestError as e:
            if e.field == "query":  # the proto field is ``query``; this route's parameter is q
                raise InvalidRequestError("q", e.description) from None
            raise
        return {"object": "list", "data": [proto_json(convert.feature_to_pb(f)) for f in found]}

    async def feature(request: Request) -> dict:
        index = _int_param("index", request.path_params["index"], 0, U32)
        req = pb.GetFeatureRequest(sae=request.path_params["sae"], index=index)
        return proto_json(convert.feature_to_pb(convert.get_feature(req, servicer.saes,
                                                                    servicer.labels)))

    async def token_pieces(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise HttpError(400, "invalid_request_error", "the body is not valid JSON", None,
                            "invalid_argument") from None
        ids = body.get("token_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list):
            raise InvalidRequestError("token_ids", "give a list of token ids")
        if len(ids) > servicer.max_model_len:
            raise InvalidRequestError("token_ids", f"{len(ids)} ids; at most the model length "
                                      f"{servicer.max_model_len}")
        vocab = servicer.limits.vocab_size
        for j, t in enumerate(ids):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise InvalidRequestError(f"token_ids[{j}]", f"must be a token id in [0, {vocab})")
        return {"pieces": [servicer.tokenizer.decode([t]) for t in ids]}

    async def index_page(request: Request) -> Response:
        return FileResponse(PLAYGROUND_DIR / "index.html")

    return [
        json_route("/v1/saes", list_saes),
        json_route("/v1/features/search", search),
        json_route("/v1/features/{sae}/{index}", feature),
        json_route("/v1/token_pieces", token_pieces, methods=("POST",)),
        Route("/", index_page, methods=["GET"]),
        Mount("/playground", app=StaticFiles(directory=PLAYGROUND_DIR), name="playground"),
    ]
