"""``TrainVector``'s checks in the core, before any Encode pass (no engine: ``RpcEngine``),
the two doors' conversions and the token rule (``Auth.check_call``). The vectors
themselves against HF and repeng, on the real engine: tests/e2e/test_train_vectors.py."""

from __future__ import annotations

import asyncio

import pytest

from sae_runtime.errors import InvalidRequestError
from sae_runtime.spec.activations import DeclaredSites
from server.auth import Auth
from server.core.errors import PermissionDeniedError, UnauthenticatedError
from server.core.types import Prompt, TrainPosition, TrainVectorRequest
from server.grpc import convert
from server.http import bodies
from steering.v1 import steering_pb2 as pb
from tests.server.test_runtime_vectors import vectors_core

SITES = DeclaredSites(("blocks.1.hook_resid_post", "blocks.3.hook_resid_post"),
                      ("blocks.1.hook_resid_post", "blocks.3.hook_resid_post"), 256)
P = (Prompt(text="a"), Prompt(text="b"))


def _req(**kw) -> TrainVectorRequest:
    return TrainVectorRequest(**{"name": "t", "positive": P, "negative": P, "layers": (1,),
                                 **kw})


@pytest.mark.parametrize("kw, msg", [
    ({"layers": (2,)}, r"^layers\[0\]: blocks.2.hook_resid_post is not readable on this "
                       r"server \(steerd serve --activation-hooks; declared: "),
    ({"layers": (1, 9)}, r"^layers\[1\]: block 9; the model has blocks 0..3"),
    ({"layers": (3,), "register": True}, r"^layers\[0\]: block 3 takes no runtime vectors.*"
                                         r"--runtime-vectors"),
    ({"register": True, "name": "start"}, "^name: 'start' is a startup vector"),
    ({"register": True, "name": ""}, "^name: give the vector a printable name"),
    ({"method": 7}, "^method: 7: MEAN_DIFF or PCA"),
    ({"method": 2, "negative": P[:1]}, "^negative: PCA takes pairs"),
    ({"positive": ()}, "^positive: give at least one prompt"),
    ({"layers": (1, 1)}, r"^layers\[1\]: layer 1 is given twice"),
])
def test_refusals_name_the_field_before_any_pass(tmp_path, kw, msg):
    core = vectors_core(tmp_path)
    core.sites = SITES
    with pytest.raises(InvalidRequestError, match=msg):
        asyncio.run(core.train_vector(_req(**kw)))
    assert core.active_streams == 0 and not core.runtime.pending


def test_no_declared_sites(tmp_path):
    core = vectors_core(tmp_path)
    with pytest.raises(InvalidRequestError, match=r"^layers\[0\]: .*declared: none"):
        asyncio.run(core.train_vector(_req()))


def test_grpc_conversion_defaults_and_fields():
    r = convert.train_vector_request(pb.TrainVectorRequest(
        name="n", positive=[pb.Prompt(text="x")], negative=[pb.Prompt(token_ids=pb.TokenIds(
            ids=[1, 2]))], layers=[2, 1], register=True, metadata={"k": "v"}))
    assert (r.method, r.position, r.positions, r.layers, r.register) == (1, TrainPosition.LAST,
                                                                         None, (2, 1), True)
    assert r.positive == (Prompt(text="x"),) and r.negative == (Prompt(ids=(1, 2)),)
    r = convert.train_vector_request(pb.TrainVectorRequest(
        method=pb.VECTOR_METHOD_PCA, position=pb.TRAIN_POSITION_MEAN,
        positions=pb.PositionSelector(ranges=[pb.PositionRange(frame=pb.POSITION_FRAME_PROMPT,
                                                               start=1)])))
    assert (r.method, r.position, r.positions.ranges[0].start) == (2, TrainPosition.MEAN, 1)
    with pytest.raises(InvalidRequestError, match="^position: unknown position 9"):
        convert.train_vector_request(pb.TrainVectorRequest(position=9))


def test_http_body_conversion():
    body = bodies.TrainVectorBody.model_validate(
        {"name": "n", "positive": ["x", [1, 2]], "negative": ["y", "z"], "layers": [1],
         "method": "pca", "position": "mean", "register": True})
    r = bodies.train_vector_request(body)
    assert (r.method, r.position, r.register) == (2, TrainPosition.MEAN, True)
    assert r.positive == (Prompt(text="x"), Prompt(ids=(1, 2)))
    with pytest.raises(InvalidRequestError, match=r"^positive\[0\]\[1\]: "):
        bodies.train_vector_request(bodies.TrainVectorBody.model_validate(
            {"positive": [[1, -2]], "negative": ["y"], "layers": [1]}))


def test_training_needs_an_ordinary_token_and_registering_an_admin_one():
    auth = Auth(tokens=(b"user",), admin=(b"root",))
    auth.check_call("Bearer user", admin=False)
    auth.check_call("Bearer root", admin=True)
    with pytest.raises(UnauthenticatedError):
        auth.check_call("Bearer root", admin=False)  # admin tokens are not ordinary ones
    with pytest.raises(UnauthenticatedError):
        auth.check_call("Bearer user", admin=True)
    Auth().check_call("", admin=False)  # auth off: anyone may train
    with pytest.raises(PermissionDeniedError):
        Auth().check_call("", admin=True)  # no admin tokens: registering is off


def test_an_encode_pass_error_names_the_train_field():
    from server.core.service import train_field

    fields = ["positive[2]", "negative[0]"]

    def f(field):
        return train_field(InvalidRequestError(field, "x"), fields).field

    assert f("inputs[1].token_ids[3]") == "negative[0].token_ids[3]"
    assert f("inputs[0]") == "positive[2]"
    assert f("activation_reads[1].positions.ranges[0]") == "positions.ranges[0]"
    assert f("activation_reads[2]") == "layers[2]"
