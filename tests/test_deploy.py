"""Deployment artifacts, checked with real tools since this machine has no Docker engine and no cluster:
hadolint on the Dockerfile, the Compose specification's JSON schema on the compose files, `kubectl kustomize` plus
the Kubernetes schemas on every overlay, and the compose file's own commands and environment run as local
processes to prove it describes a working system. tests/test_docker.py builds the image and runs the compose
stack for real where a Docker engine is reachable."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import torch
import yaml

from baton.engine.models import LoadedModel
from tests.support.processes import ROOT, free_port, processes

DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
OVERLAYS = sorted((ROOT / "deploy" / "k8s" / "overlays").iterdir())


# ---- YAML as Compose reads it --------------------------------------------------------------------------------
class ComposeLoader(yaml.SafeLoader):
    """PyYAML plus Compose's merge tags (`!reset` clears a value in an override file, `!override` replaces it)."""


def _construct_tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node)
    assert isinstance(node, yaml.ScalarNode)
    return loader.construct_scalar(node)


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _construct_tagged)


def load_compose(path: Path) -> dict[str, Any]:
    data = yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 - a SafeLoader subclass
    assert isinstance(data, dict)
    return data


_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${NAME}` and `${NAME:-default}` (the only forms our files use)."""
    return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


# ---- static checks -------------------------------------------------------------------------------------------
def tool(name: str) -> str:
    exe = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    assert exe, f"{name} is needed (installed by `make setup` with the test extras)"
    return exe


def test_dockerfile_passes_hadolint() -> None:
    proc = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_runs_as_non_root_with_a_grpc_healthcheck() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^USER 10001", text, re.M)
    assert re.search(r'^HEALTHCHECK .*CMD \["baton", "health"\]', text, re.M)
    # one base for every stage, so that no builder pulls an image it does not use
    assert re.search(r"^ARG BASE=\S+", text, re.M)
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE}", "${BASE}"]


def compose_schema() -> dict[str, Any]:
    import check_jsonschema

    path = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU], ids=lambda p: p.name)
def test_compose_file_matches_the_compose_specification(path: Path) -> None:
    jsonschema.validate(load_compose(path), compose_schema())


def test_compose_reserves_gpus_for_workers_and_waits_for_health() -> None:
    services = load_compose(COMPOSE)["services"]
    for name in ("prefill", "decode"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert "ports" not in services[name], "workers are scaled with --scale: no fixed host ports"
        assert "models:/models" in services[name]["volumes"]
    assert "healthcheck" in services["redis"]
    assert {k: v["condition"] for k, v in services["router"]["depends_on"].items()} == {
        "redis": "service_healthy", "prefill": "service_healthy", "decode": "service_healthy"}
    for name, svc in services.items():  # a service that exits is started again (docs/reliability.md)
        assert svc.get("restart") == "unless-stopped", name
    cpu = load_compose(COMPOSE_CPU)["services"]
    for name in ("prefill", "decode"):
        assert cpu[name]["deploy"]["resources"]["reservations"]["devices"] == []
        assert cpu[name]["environment"]["BATON_DEVICE"] == "cpu"


@pytest.fixture(scope="module", params=[p.name for p in OVERLAYS])
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed on this machine")
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "deploy/k8s/overlays" / request.param)],
                         capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_every_overlay_renders_and_validates_against_kubernetes_schemas(rendered: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    for doc in rendered:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered}
    for expected in [("Deployment", "baton-router"), ("Deployment", "baton-prefill"), ("Deployment", "baton-decode"),
                     ("Deployment", "baton-redis"), ("Service", "baton-router"), ("Service", "baton-workers"),
                     ("ConfigMap", "baton-config"), ("PodDisruptionBudget", "baton-decode"),
                     ("HorizontalPodAutoscaler", "baton-router"), ("NetworkPolicy", "baton-decode")]:
        assert expected in kinds, expected


def test_overlays_probe_grpc_health_and_give_workers_their_resources(rendered: list[dict[str, Any]]) -> None:
    deployments = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Deployment"}
    gpu = any(d["kind"] == "Deployment" and "nvidia.com/gpu" in json.dumps(d) for d in rendered)
    for name in ("baton-router", "baton-prefill", "baton-decode"):
        spec = deployments[name]["spec"]["template"]["spec"]
        container = spec["containers"][0]
        assert "grpc" in container["readinessProbe"] and "grpc" in container["livenessProbe"]
        assert container["livenessProbe"]["grpc"]["service"] == "liveness"
        assert "limits" in container["resources"] and "requests" in container["resources"]
        if name != "baton-router" and gpu:
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    decode = deployments["baton-decode"]["spec"]["template"]["spec"]
    drain = next(e["value"] for e in decode["containers"][0]["env"] if e["name"] == "BATON_DRAIN_S")
    assert float(drain) < decode["terminationGracePeriodSeconds"], "the drain must end before SIGKILL"
    for name in ("baton-router", "baton-prefill", "baton-decode"):  # the internal token, from the Secret
        env = {e["name"]: e for e in deployments[name]["spec"]["template"]["spec"]["containers"][0]["env"]}
        ref = env["BATON_INTERNAL_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "baton-internal-token" and not ref.get("optional", False)
    budgets = {d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
               for d in rendered if d["kind"] == "PodDisruptionBudget"}
    assert {"baton-router", "baton-prefill", "baton-decode"} <= budgets
    headless = next(d for d in rendered if d["kind"] == "Service" and d["metadata"]["name"] == "baton-workers")
    assert headless["spec"]["clusterIP"] == "None"


# ---- the compose file, run as local processes ----------------------------------------------------------------
def compose_services() -> dict[str, dict[str, Any]]:
    """docker-compose.yml merged with docker-compose.cpu.yml (this machine has no GPU), interpolated with the
    defaults a user with an empty shell environment gets."""
    base, cpu = load_compose(COMPOSE)["services"], load_compose(COMPOSE_CPU)["services"]
    merged: dict[str, dict[str, Any]] = {}
    for name, svc in base.items():
        env = {k: interpolate(str(v), {}) for k, v in (svc.get("environment") or {}).items()}
        env.update({k: interpolate(str(v), {}) for k, v in (cpu.get(name, {}).get("environment") or {}).items()})
        merged[name] = {**svc, "environment": env}
    return merged


def start_order(services: dict[str, dict[str, Any]]) -> list[str]:
    order: list[str] = []
    while len(order) < len(services):
        for name, svc in services.items():
            if name not in order and all(d in order for d in svc.get("depends_on", {})):
                order.append(name)
    return order


def entrypoint() -> list[str]:
    m = re.search(r"^ENTRYPOINT (\[.*\])$", DOCKERFILE.read_text(), re.M)
    assert m
    exe: list[str] = json.loads(m.group(1))
    assert exe == ["baton"]
    return [sys.executable, "-m", "baton.cli"]  # what the image's `baton` runs


@pytest.fixture(scope="module")
def compose_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Every service of the compose file started with its own command and environment. Only what the container
    network provides is replaced: service names resolve to 127.0.0.1 and each service gets a free port."""
    services = compose_services()
    assert start_order(services)[0] == "redis" and start_order(services)[-1] == "router"
    with processes(tmp_path_factory.mktemp("compose-logs")) as ps:
        redis = services["redis"]
        argv = list(redis["command"])
        redis_port = free_port()
        argv[argv.index("--port") + 1] = str(redis_port)
        redis_proc = subprocess.Popen([tool(argv[0]), *argv[1:], "--bind", "127.0.0.1"],
                                      stdout=(ps.logs / "redis.log").open("wb"), stderr=subprocess.STDOUT)
        ps.procs.append(redis_proc)
        check = [c for c in redis["healthcheck"]["test"][1:]]
        check[check.index("-p") + 1] = str(redis_port)
        wait_for(lambda: subprocess.run(check, capture_output=True, text=True).stdout.strip() == "PONG", "redis")

        ports: dict[str, int] = {}
        envs: dict[str, dict[str, str]] = {}
        for name in start_order(services)[1:]:
            svc = services[name]
            env = {k: v for k, v in os.environ.items() if not k.startswith("BATON_")}
            env.update(svc["environment"])
            assert env["BATON_REDIS"] == "redis://redis:6379/0"
            env["BATON_REDIS"] = f"redis://127.0.0.1:{redis_port}/0"
            env["BATON_HOST"] = "127.0.0.1"
            env["BATON_THREADS"] = "1"
            if env.get("BATON_SHARED_CORES"):  # a path on the models volume, which these processes do not have
                env["BATON_SHARED_CORES"] = str(ps.logs / "cores")
            for key in ("BATON_PORT", "BATON_GRPC_PORT", "BATON_HTTP_PORT", "BATON_METRICS_PORT"):
                if key in env:
                    env[key] = str(free_port())
            if "BATON_PORT" in env:
                env["BATON_ADVERTISE"] = f"127.0.0.1:{env['BATON_PORT']}"
            log = ps.logs / f"{name}.log"
            proc = subprocess.Popen([*entrypoint(), *svc["command"]], cwd=ROOT, env=env,
                                    stdout=log.open("wb"), stderr=subprocess.STDOUT)
            ps.procs.append(proc)
            envs[name] = env

            def healthy(env: dict[str, str] = env, proc: subprocess.Popen[bytes] = proc, log: Path = log) -> bool:
                assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-3000:]}"
                # the image's HEALTHCHECK, with the service's environment
                return subprocess.run([*entrypoint(), "health"], env=env, capture_output=True).returncode == 0

            wait_for(healthy, name, timeout=180)
        ports["http"] = int(envs["router"]["BATON_HTTP_PORT"])
        yield {"http": f"http://127.0.0.1:{ports['http']}", "procs": dict(zip(start_order(services)[1:],
                                                                                ps.procs[1:])), "logs": ps.logs}


def wait_for(ok: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.3)
    raise TimeoutError(f"{what} not healthy after {timeout} s")


@pytest.mark.slow
def test_compose_stack_runs_as_local_processes(compose_stack: dict[str, Any], smollm2: LoadedModel) -> None:
    prompts = ["The capital of France is", "Once upon a time, a small robot"]
    with httpx.Client(base_url=compose_stack["http"], timeout=120) as http, ThreadPoolExecutor(2) as pool:
        models = http.get("/v1/models").json()
        assert models["data"][0]["id"] == "smollm2-135m"
        replies = list(pool.map(lambda p: http.post("/v1/completions", json={
            "model": "smollm2-135m", "prompt": p, "max_tokens": 12, "temperature": 0}), prompts))
    tok = smollm2.tokenizer
    assert tok is not None
    for prompt, reply in zip(prompts, replies):
        assert reply.status_code == 200, reply.text
        ids = tok(prompt)["input_ids"]
        ref = smollm2.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
        assert reply.json()["choices"][0]["text"] == tok.decode(ref, skip_special_tokens=True)
    # SIGTERM, as `docker compose down` sends it: every Baton service drains and exits 0.
    for name in ("router", "decode", "prefill"):
        proc = compose_stack["procs"][name]
        proc.terminate()
        assert proc.wait(timeout=60) == 0, (compose_stack["logs"] / f"{name}.log").read_text()[-3000:]
