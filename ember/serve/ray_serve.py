"""ember's OpenAI server as a Ray Serve deployment: Ray Serve places the replicas on the cluster, scales them
(a fixed `num_replicas` or its autoscaling on ongoing requests) and routes HTTP to them through its proxy; each
replica is one ember engine serving ember's own app (the same routes, errors and metrics as `ember serve`).

    serve run ember.serve.ray_serve:build_app model=/models/qwen num_replicas=2 dtype=bfloat16

or from Python: `serve.run(build_app({"model": ..., "autoscaling_config": {...}}))`. Every key that is not a
deployment option is an engine option (`ember serve`'s, with underscores: max_num_seqs, enable_lora, ...) or
one of `served_model_name`, `api_key`, `lora_modules`, `max_waiting`. Engine and deployment options given as
text (`serve run`'s key=value) are read as JSON where they parse (2, true, {"min_replicas": 1}), else kept as
strings; server options stay text (an all-digit api_key is a key).

Ray Serve LLM's own `LLMServer` takes an engine class too, but its request and response models import vLLM or
SGLang (it raises without one of them), so ember plugs in one level up, as a deployment of its own server.
"""

from __future__ import annotations

import json
import logging

logger = logging.getLogger(__name__)

# Ray Serve's options for the deployment itself; every other key configures ember.
DEPLOYMENT_KEYS = ("num_replicas", "autoscaling_config", "ray_actor_options", "max_ongoing_requests",
                   "health_check_period_s", "health_check_timeout_s", "graceful_shutdown_timeout_s")
SERVER_KEYS = ("served_model_name", "api_key", "lora_modules", "max_waiting", "revision", "gguf_file")


def _value(raw):
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


class EmberReplica:
    """One replica: an ember engine and its OpenAI app (built once the engine is up: Serve's deferred ingress)."""

    def __init__(self, model: str | None, server: dict, engine: dict):
        from ember.engine.async_llm import AsyncLLM

        self.name = server.get("served_model_name") or model or "default"
        self.server = server
        self.llm = AsyncLLM.from_args(model, max_waiting=server.get("max_waiting"), revision=server.get("revision"),
                                      gguf_file=server.get("gguf_file"), **engine)
        logger.info("ember replica up: %s", self.name)

    def __serve_build_asgi_app__(self):
        from ember.serve.app import ServerConfig, build_app, make_state

        state = make_state(self.llm, self.name, lora_modules=self.server.get("lora_modules"))
        return build_app(state, ServerConfig(api_key=self.server.get("api_key")))

    def check_health(self) -> None:
        """Serve's health probe: a replica whose engine loop has stopped is replaced, not left answering 503s."""
        if self.llm.dead is not None:
            raise RuntimeError(f"the ember engine stopped: {self.llm.dead}")

    def __del__(self):
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.shutdown()


def build_app(args: dict):
    """A Ray Serve application of ember replicas from `args` (see the module's docstring); ValueError naming
    an unknown key or a bad value before anything starts."""
    from ray import serve

    from ember.engine.config import EngineConfig

    args = dict(args)
    model = args.pop("model", None)
    server = {key: args.pop(key) for key in SERVER_KEYS if key in args}  # text stays text (an all-digit api_key)
    if server.get("max_waiting") is not None:
        server["max_waiting"] = int(server["max_waiting"])
    args = {key: _value(value) for key, value in args.items()}
    deployment = {key: args.pop(key) for key in DEPLOYMENT_KEYS if key in args}
    # Serve's default (5 requests in flight per replica) would cap continuous batching at 5 sequences: the
    # engine queues and refuses (max_waiting) on its own.
    deployment.setdefault("max_ongoing_requests", 1024)
    try:  # every engine option checked here, not in each replica after Serve has placed it
        EngineConfig.from_kwargs(model or "default", **args)
    except TypeError as e:
        raise ValueError(f"ember.serve.ray_serve: {e} (deployment options are {list(DEPLOYMENT_KEYS)}, server "
                         f"options {list(SERVER_KEYS)})") from None
    if isinstance(server.get("lora_modules"), str):  # a JSON object, or name=path,name=path as ember serve takes
        parsed = _value(server["lora_modules"])
        server["lora_modules"] = parsed if isinstance(parsed, dict) else \
            dict(item.split("=", 1) for item in server["lora_modules"].split(",") if item)
    num_cpus = (deployment.get("ray_actor_options") or {}).get("num_cpus")
    if num_cpus and "threads" not in args:  # compute threads = the CPUs Serve reserved for the replica
        args["threads"] = max(1, int(num_cpus))
    try:
        ingress = serve.ingress()  # the app comes from the replica once its engine has loaded
    except TypeError:
        raise ValueError("ember.serve.ray_serve needs a Ray Serve whose serve.ingress() builds the app on the "
                         "replica (__serve_build_asgi_app__): upgrade ray[serve]") from None
    replica = serve.deployment(name="ember", **deployment)(ingress(EmberReplica))
    return replica.bind(model, server, args)
