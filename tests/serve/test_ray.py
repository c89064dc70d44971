"""Ray as the placement layer: a local cluster of two simulated nodes (`ray.cluster_utils.Cluster`) runs
TP=2 (the worker a Ray actor) and DP=2 (each replica started by an actor on its node) and answers as the
multiprocessing path does. Slow; skipped without `ray` (pip install 'ember[ray]')."""

from __future__ import annotations

import os

import httpx
import pytest

from ember import LLM, SamplingParams
from tests.engine.test_tensor_parallel import PROMPTS, generate
from tests.serve.conftest import free_port
from tests.serve.test_shutdown import start, wait_ready

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_tp2_on_ray_answers_as_on_processes(cluster, model_factory):
    path = model_factory("llama", std=0.2)
    expected = [o.outputs[0].token_ids for o in generate(path, 2)]
    llm = LLM(str(path), dtype="float32", tensor_parallel_size=2, distributed_executor="ray")
    try:
        got = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                           SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == expected
    finally:
        llm.engine.shutdown()


def test_dp2_on_ray_answers_as_one_replica(cluster, model_factory):
    path = model_factory("llama", std=0.2)
    expected = [o.outputs[0].text for o in generate(path, 1)[:4]]
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    proc = start(path, port, "--data-parallel-size", "2", "--distributed-executor", "ray", "--threads", "1", env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, base)
        replicas = httpx.get(f"{base}/router/replicas").json()["replicas"]
        assert len(replicas) == 2 and all(r["healthy"] for r in replicas)
        assert ray.available_resources().get("CPU", 0) == 0  # the replicas' actors hold both nodes' CPUs
        for prompt, text in zip(PROMPTS, expected):
            r = httpx.post(f"{base}/v1/completions", timeout=120, json={
                "model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == text
        placed = httpx.get(f"{base}/router/replicas").json()["replicas"]
        assert sum(r["num_requests"] for r in placed) == 4
    finally:
        proc.terminate()
        proc.communicate(timeout=120)
    assert proc.returncode == 0


def test_ray_serve_deployment_answers_as_one_process(cluster, model_factory):
    """ember's server as a Ray Serve deployment (ember.serve.ray_serve): two replicas placed by Serve behind its
    proxy answer, streamed or not, as one process does; a bad option is refused before anything starts."""
    from openai import OpenAI
    from ray import serve

    from ember.serve.ray_serve import build_app

    path = model_factory("llama", std=0.2)
    expected = [o.outputs[0].text for o in generate(path, 1)[:4]]
    with pytest.raises(ValueError, match="max_num_seq"):
        build_app({"model": str(path), "max_num_seq": "4"})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        # as `serve run ember.serve.ray_serve:build_app key=value ...` passes them: text, read as JSON
        serve.run(build_app({"model": str(path), "dtype": "float32", "num_replicas": "2", "served_model_name": "tiny",
                             "ray_actor_options": '{"num_cpus": 0.5}'}), name="ember", route_prefix="/")
        deployment = serve.status().applications["ember"].deployments["ember"]
        assert deployment.replica_states.get("RUNNING") == 2
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120)
        for prompt, text in zip(PROMPTS, expected):
            out = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                            extra_body={"ignore_eos": True})
            assert out.choices[0].text == text
        stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected[0]
    finally:
        serve.shutdown()
