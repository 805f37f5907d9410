"""The workers' actor methods called in-process (no Ray), on the tiny model: calls that reach a
worker out of order."""

import asyncio
import dataclasses

import pytest

from decode_worker.worker import DecodeWorker
from engine.config import EngineConfig
from engine.engine_loop import EarlyAborts
from engine.sampling_params import SamplingParams
from prefill_worker.worker import PrefillAborted, PrefillWorker

PARAMS = dataclasses.asdict(SamplingParams(max_tokens=4, temperature=0))


def in_use(worker) -> int:
    return worker.engine.stats()["kv_blocks"]["in_use"]


def test_an_abort_that_overtakes_its_call_leaves_nothing_behind(tiny_model):
    """Ray may run an async actor's abort() before the reserve(), submit() or prefill() it was
    sent after (that call waiting for a large argument): the late call then takes nothing, where
    it would have held blocks until the reservation expired (11 minutes), or run to max_tokens."""

    async def body():
        config = EngineConfig(tiny_model, num_kv_blocks=64)
        secret = bytes(range(16))
        decode = DecodeWorker("d", config, transfer="grpc", kv_secret=secret)
        colocated = DecodeWorker("c", config, role="colocated", transfer=None)
        prefill = PrefillWorker("p", config, transfer="grpc", kv_secret=secret)
        try:
            prompt = list(range(5, 40))
            assert not await decode.abort("r#1") and not await colocated.abort("c#1") and not await prefill.abort("p#1")
            refused = await decode.reserve("r#1", prompt, PARAMS)
            await colocated.submit("c#1", prompt, PARAMS)
            with pytest.raises(PrefillAborted):
                destination = {"address": (await decode.reserve("r#2", prompt, PARAMS))["address"], "block_ids": [0, 1, 2]}
                await prefill.prefill("p#1", prompt, PARAMS, destination)
            outputs = await colocated.get_outputs(0.2)
            usage = in_use(decode), in_use(colocated), in_use(prefill)
            assert await decode.abort("r#2")  # the reservation made in order: found and freed
            return refused, outputs, usage, in_use(decode)
        finally:
            for worker in (decode, colocated, prefill):
                await worker.shutdown()

    refused, outputs, usage, after = asyncio.run(body())
    assert refused["block_ids"] is None and outputs["outputs"] == []
    assert usage == (3, 0, 0) and after == 0  # only r#2's reservation held blocks


def test_early_aborts_remember_the_last_ones():
    aborts = EarlyAborts(keep=2)
    for request_id in ("a", "b", "c"):
        aborts.add(request_id)
    assert "a" not in aborts and "b" in aborts and "c" in aborts
