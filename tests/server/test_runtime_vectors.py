"""Runtime-loaded steering vectors in the core (no engine: ``FakeEngine`` stands in for vLLM,
its ``collective_rpc`` records the rows the workers would be told to write): the row
bookkeeping and refcounts of ``server.core.vectors``, ``Core.load_vector`` /
``unload_vector`` and their errors, the cache salt of a reused row, and the admin check.
Behaviour against the real engine (tokens vs HF, loads while requests stream) is
tests/e2e/test_runtime_vectors.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from sae_runtime.errors import InvalidRequestError, ResourceLimitError, UnknownVectorError
from sae_runtime.loading.vectors import build_banks, write_vector_gguf
from sae_runtime.spec.vectors import VectorIndex
from server.auth import Auth
from server.core.errors import PermissionDeniedError, UnauthenticatedError
from server.core.service import Core
from server.core.types import GenerateRequest, LoadVectorRequest, NamedVector, Prompt
from server.core.validate import Limits
from server.core.vectors import RuntimeVectors
from tests.server.engines import FakeEngine

D = 256  # FakeEngine's hidden size
ROWS = 2


def _index(tmp_path, runtime_layers=(1, 2), startup=True) -> VectorIndex:
    files = []
    if startup:
        p = tmp_path / "start.npy"
        arr = np.zeros((4, D), np.float32)
        arr[1] = 1.0
        np.save(p, arr)
        files = [("start", p)]
    return VectorIndex.of(build_banks(files, d_model=D, n_layers=4, runtime_layers=runtime_layers,
                                      runtime_rows=ROWS))


def test_runtime_rows_follow_the_named_ones_and_precede_the_inline_row(tmp_path):
    (b1,) = [b for b in build_banks([], d_model=D, n_layers=4, inline_layers=(1,),
                                    runtime_layers=(1,), runtime_rows=3)]
    assert list(b1.runtime_rows) == [0, 1, 2] and b1.inline_row == 3
    assert b1.config().d_sae == 4
    idx = _index(tmp_path)
    assert idx.runtime[1] == ("vectors@L1", range(1, 3))  # row 0 is the startup vector
    assert idx.runtime[2] == ("vectors@L2", range(0, 2))


def test_reserve_commit_unload_and_the_rows_of_a_vector_in_use(tmp_path):
    rv = RuntimeVectors(_index(tmp_path), ROWS)
    rows = rv.reserve("a", [1, 2])
    assert rows == {1: 1, 2: 0}
    assert "a" not in rv.index.rows  # not nameable before every worker wrote it
    rv.commit("a", rows, "t1")
    assert rv.index.rows["a"] == {1: ("vectors@L1", 1), 2: ("vectors@L2", 0)}
    assert rv.index.tags == {"a": "t1"} and rv.index.rows["start"] == {1: ("vectors@L1", 0)}
    release = rv.acquire(["a", "start", "a"])
    assert rv.live["a"].users == 1
    rv.unload("a")
    assert "a" not in rv.index.rows and "a" not in rv.index.tags
    assert rv.free == {1: [2], 2: [1]}, "rows freed while a request still uses them"
    # the name is free again at once; the old rows are not
    rows_b = rv.reserve("a", [1])
    assert rows_b == {1: 2}
    rv.commit("a", rows_b, "t2")
    with pytest.raises(ResourceLimitError, match=r"layers\[0\].layer: all 2 runtime vector rows of block 1"):
        rv.reserve("c", [1])
    release()
    release()  # idempotent
    assert rv.free == {1: [1], 2: [0, 1]} and not rv.draining
    assert rv.index.rows["a"] == {1: ("vectors@L1", 2)} and rv.index.tags["a"] == "t2"


def test_refusals_name_the_field(tmp_path):
    rv = RuntimeVectors(_index(tmp_path), ROWS)
    with pytest.raises(InvalidRequestError, match="^name: 'start' is a startup vector"):
        rv.reserve("start", [1])
    with pytest.raises(InvalidRequestError, match="^name: .vectors@L1.: names may not"):
        rv.reserve("vectors@L1", [1])
    with pytest.raises(InvalidRequestError, match="^name: give the vector a printable name"):
        rv.reserve("", [1])
    with pytest.raises(InvalidRequestError, match=r"^layers\[1\].layer: block 0 takes no runtime"):
        rv.reserve("x", [1, 0])
    with pytest.raises(InvalidRequestError, match=r"^file: block 3 takes no runtime"):
        rv.reserve("x", [3], "file")
    assert rv.free == {1: [1, 2], 2: [0, 1]} and not rv.pending
    rows = rv.reserve("x", [1])
    with pytest.raises(InvalidRequestError, match="^name: a vector named 'x' is being loaded"):
        rv.reserve("x", [2])
    rv.cancel("x", rows)
    assert rv.free == {1: [1, 2], 2: [0, 1]} and "x" not in rv.index.rows
    with pytest.raises(UnknownVectorError, match="^name: no runtime vector named 'x'"):
        rv.unload("x")
    with pytest.raises(InvalidRequestError, match="^name: 'start' is a startup vector"):
        rv.unload("start")
    off = RuntimeVectors(_index(tmp_path, runtime_layers=()), ROWS)
    with pytest.raises(InvalidRequestError, match="^layers: this server keeps no rows"):
        off.reserve("x", [1])


class RpcEngine(FakeEngine):
    """A FakeEngine whose workers answer ``sae_write_vectors`` (one worker), recording it."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.engine_core = SimpleNamespace()
        self.writes: list = []

    async def collective_rpc(self, method, args=()):
        assert method == "sae_write_vectors"
        (writes,) = args
        self.writes.append(writes)
        return [{"ranks": {}, "written": sorted({h for h, _, _ in writes})}]


def vectors_core(tmp_path, engine=None) -> Core:
    start = np.zeros(D, np.float32)
    start[:] = 1.0
    return Core(engine or RpcEngine(step_s=0.01), model="/models/tiny", saes={}, compiled=False,
                limits=Limits(max_interventions=8, vocab_size=100, max_read_top_k=64),
                vectors=_index(tmp_path), runtime_vectors=ROWS,
                vector_values={"start": {1: start}})


def _gen(name: str, n: int = 3) -> GenerateRequest:
    return GenerateRequest(prompt=Prompt(ids=[1, 2, 3]), max_tokens=n,
                           vectors=(NamedVector(name, 2.0),))


def test_load_writes_every_row_then_requests_may_name_it(tmp_path):
    async def run():
        core = vectors_core(tmp_path)
        v1, v2 = np.full(D, 0.5, np.float32), np.arange(D, dtype=np.float32)
        info = await core.load_vector(LoadVectorRequest("ocean", ((2, v2), (1, v1)),
                                                        metadata=(("method", "caa"),)))
        assert info.layers == (1, 2) and info.runtime and dict(info.metadata) == {"method": "caa"}
        (writes,) = core.engine.writes
        # hook ids: no SAEs, so the banks in layer order (L1 = 0, L2 = 1); rows after "start"
        assert [(h, r) for h, r, _ in writes] == [(1, 0), (0, 1)]
        assert np.frombuffer(writes[0][2], "<f4").tolist() == v2.tolist()
        assert np.frombuffer(writes[1][2], "<f4").tolist() == v1.tolist()
        from server.core import validate

        gen = validate.generation(_gen("ocean"), saes=core.saes, limits=core.limits,
                                  vectors=core.vectors)
        assert sorted((iv.sae, iv.feature, iv.value) for iv in gen.spec.interventions) == [
            ("vectors@L1", 1, 2.0), ("vectors@L2", 0, 2.0)]
        chunks = [c async for c in await core.generate(_gen("ocean"))]
        assert chunks[-1].finish_reason is not None
        listed = {v.name: (v.layers, v.runtime) for v in core.list_vectors()}
        assert listed == {"start": ((1,), False), "ocean": ((1, 2), True)}
        info = core.model_info()
        assert info.runtime_vector_layers == (1, 2) and info.max_runtime_vectors == ROWS

    asyncio.run(run())


def test_unload_while_a_request_runs_keeps_its_rows_to_its_end(tmp_path):
    async def run():
        core = vectors_core(tmp_path)
        await core.load_vector(LoadVectorRequest("a", ((1, np.ones(D, np.float32)),)))
        stream = await core.generate(_gen("a", n=30))
        first = await anext(stream)
        assert first.token_ids
        core.unload_vector("a")
        with pytest.raises(InvalidRequestError, match=r"^vectors\[0\].name: unknown steering vector 'a'"):
            await core.generate(_gen("a"))
        assert core.runtime.free[1] == [2], "the running request's row was freed"
        rest = [c async for c in stream]
        assert rest[-1].finish_reason is not None
        assert core.runtime.free[1] == [1, 2]

    asyncio.run(run())


def test_a_reused_row_gets_another_cache_salt(tmp_path):
    async def run():
        core = vectors_core(tmp_path)
        from server.core import validate

        def salt():
            gen = validate.generation(_gen("a"), saes=core.saes, limits=core.limits,
                                      vectors=core.vectors)
            return gen.spec.cache_salt()

        await core.load_vector(LoadVectorRequest("a", ((1, np.ones(D, np.float32)),)))
        first = salt()
        core.unload_vector("a")
        await core.load_vector(LoadVectorRequest("a", ((1, -np.ones(D, np.float32)),)))
        assert core.runtime.live["a"].rows == {1: 1}  # the same row holds other values
        assert salt() != first

    asyncio.run(run())


def test_load_errors_name_the_field_and_give_the_rows_back(tmp_path):
    async def run():
        core = vectors_core(tmp_path)
        ok = np.ones(D, np.float32)
        cases = [
            (LoadVectorRequest("x"), "layers: give the vector's values"),
            (LoadVectorRequest("x", ((1, np.ones(3, np.float32)),)),
             "layers[0].values: 3 values; the model's hidden size is 256"),
            (LoadVectorRequest("x", ((1, np.full(D, np.nan, np.float32)),)),
             "layers[0].values: values must be finite"),
            (LoadVectorRequest("x", ((1, ok), (1, ok))), "layers[1].layer: block 1 is given twice"),
            (LoadVectorRequest("x", ((7, ok),)), "layers[0].layer: block 7; the model has blocks 0..3"),
            (LoadVectorRequest("x", ((0, ok),)), "layers[0].layer: block 0 takes no runtime"),
            (LoadVectorRequest("x", file=b"junk", file_format="npz"), "file_format: 'npz'"),
            (LoadVectorRequest("x", file=b"junk", file_format="gguf"), "file: "),
            (LoadVectorRequest("x", ((1, ok),), file=b"junk", file_format="gguf"),
             "file: give the values by layer or a file"),
        ]
        for req, want in cases:
            with pytest.raises(InvalidRequestError) as ei:
                await core.load_vector(req)
            assert str(ei.value).startswith(want), (want, str(ei.value))
        assert core.runtime.free == {1: [1, 2], 2: [0, 1]} and not core.runtime.pending
        assert not core.engine.writes

    asyncio.run(run())


def test_a_described_file_for_another_model_or_width_is_refused(tmp_path):
    async def run():
        core = vectors_core(tmp_path)
        v = {1: np.ones(D, np.float32)}
        other = write_vector_gguf(tmp_path / "o.gguf", v, model_id="meta-llama/Llama-3.1-8B",
                                  hidden_size=D)
        with pytest.raises(InvalidRequestError, match="^file: the vector was made for model "
                           "'meta-llama/Llama-3.1-8B'; this server serves '/models/tiny'"):
            await core.load_vector(LoadVectorRequest("x", file=other.read_bytes(),
                                                     file_format="gguf"))
        wide = write_vector_gguf(tmp_path / "w.gguf", {1: np.ones(64, np.float32)},
                                 model_id="org/tiny", hidden_size=64)
        with pytest.raises(InvalidRequestError, match="^file: the vector was made for hidden size 64"):
            await core.load_vector(LoadVectorRequest("x", file=wide.read_bytes(),
                                                     file_format="gguf"))
        mine = write_vector_gguf(tmp_path / "m.gguf", {2: np.ones(D, np.float32)},
                                 model_id="elsewhere/tiny", hidden_size=D, method="caa")
        info = await core.load_vector(LoadVectorRequest("x", file=mine.read_bytes(),
                                                        file_format="gguf"))
        meta = dict(info.metadata)
        assert info.layers == (2,) and meta["method"] == "caa" and meta["hidden_size"] == str(D)
        assert meta["hook_names"] == "blocks.2.hook_resid_post"

    asyncio.run(run())


def test_a_failed_worker_write_frees_the_rows(tmp_path):
    class Failing(RpcEngine):
        async def collective_rpc(self, method, args=()):
            raise RuntimeError("rank 1 is gone")

    async def run():
        core = vectors_core(tmp_path, Failing())
        from sae_runtime.errors import InternalServerError

        with pytest.raises(InternalServerError, match="could not write"):
            await core.load_vector(LoadVectorRequest("x", ((1, np.ones(D, np.float32)),)))
        assert core.runtime.free[1] == [1, 2] and "x" not in core.vectors.rows

    asyncio.run(run())


def test_admin_calls_take_admin_tokens_only():
    off = Auth((b"user",))
    with pytest.raises(PermissionDeniedError, match="--admin-tokens-file"):
        off.check_admin("Bearer user")
    auth = Auth((b"user",), admin=(b"root",))
    auth.check_admin("Bearer root")
    for bad in ("Bearer user", "", "Bearer rootx", "Basic root"):
        with pytest.raises(UnauthenticatedError):
            auth.check_admin(bad)
    assert not auth.ok("Bearer root"), "an admin token must give no ordinary access"


def test_export_writes_a_described_gguf_of_any_vector(tmp_path):
    from sae_runtime.loading.vectors import load_vector_bytes

    async def run():
        core = vectors_core(tmp_path)
        v = np.linspace(-1, 1, D).astype(np.float32)
        await core.load_vector(LoadVectorRequest("a", ((2, v),), metadata=(("method", "pca"),)))
        data, info = await core.export_vector("a")
        values, meta = load_vector_bytes(data, "gguf")
        assert list(values) == [2] and np.array_equal(values[2], v) and info.runtime
        assert (meta["model_id"], meta["hidden_size"], meta["method"]) == ("/models/tiny",
                                                                           str(D), "pca")
        data, info = await core.export_vector("start")
        values, _ = load_vector_bytes(data, "gguf")
        assert list(values) == [1] and (values[1] == 1.0).all() and not info.runtime
        with pytest.raises(UnknownVectorError, match="^name: no steering vector named 'b'"):
            await core.export_vector("b")

    asyncio.run(run())


def test_a_runtime_vector_is_budgeted_as_a_startup_vector(tmp_path):
    """One budget (``sae_runtime.spec.budget``): a runtime vector's edit rows on its bank
    count exactly as a startup vector's at the same layer."""
    from sae_runtime.spec.selectors import Frame, Range, Selector
    from server.core import validate

    async def run():
        core = vectors_core(tmp_path)
        await core.load_vector(LoadVectorRequest("a", ((1, np.ones(D, np.float32)),)))
        many = Selector(tuple(Range(Frame.ABSOLUTE, 2 * j, 2 * j + 1) for j in range(5)))
        tight = Limits(max_interventions=4, vocab_size=100, max_read_top_k=64)
        errors = []
        for name in ("start", "a"):
            req = GenerateRequest(prompt=Prompt(ids=[1, 2, 3]), max_tokens=2,
                                  vectors=(NamedVector(name, 1.0, (1,), many),))
            with pytest.raises(InvalidRequestError) as ei:
                validate.generation(req, saes=core.saes, limits=tight, vectors=core.vectors)
            errors.append(str(ei.value))
            fits = GenerateRequest(prompt=Prompt(ids=[1, 2, 3]), max_tokens=2,
                                   vectors=(NamedVector(name, 1.0, (1,), Selector(many.ranges[:4])),))
            validate.generation(fits, saes=core.saes, limits=tight, vectors=core.vectors)
        assert errors[0] == errors[1] and errors[0].startswith("vectors: the vectors at vectors@L1 need 5")

    asyncio.run(run())
