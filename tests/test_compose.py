"""docker-compose.yml: it parses, has the production shape, and every command it runs exists.

No Docker engine here: the commands are checked by asking each one for
``--help`` with the exact arguments the compose file gives it, so unknown
options or subcommands fail the test.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = (
    "DCM_HOME",
    "DCM_DATABASE_URL",
    "CELERY_BROKER_URL",
    "DCM_SERVICES_PATH",
    "DCM_SETTINGS",
    "DCM_STABLE_AGE",
    "DCM_DETECT_INTERVAL",
    "DCM_DETECT_LEVELS",
    "DCM_DEFAULT_EVENTS",
    "DCM_HEADER_FIELDS",
    "DCM_ORTHANC_URL",
    "DCM_API_TOKEN",
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def our_commands(compose: dict[str, Any]) -> dict[str, list[str]]:
    return {
        name: service["command"]
        for name, service in compose["services"].items()
        if service.get("image", "").startswith("dcm-processor-job-scheduler")
    }


def test_compose_has_the_production_shape(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {
        "redis",
        "postgres",
        "orthanc",
        "beat",
        "planner",
        "worker-default",
        "api",
        "flower",
    } <= set(services)
    commands = our_commands(compose)
    assert commands["beat"][:4] == ["celery", "-A", "scheduler", "beat"]
    assert commands["planner"][commands["planner"].index("-Q") + 1] == "dcm.planning"
    assert commands["worker-default"][commands["worker-default"].index("-Q") + 1] == "default"
    assert any("--basic-auth=${FLOWER_BASIC_AUTH}" in arg for arg in commands["flower"])
    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    for name in commands:
        environment = services[name]["environment"]
        assert set(SETTINGS) <= set(environment), name
        assert any(v.endswith(":/data/outputs") for v in services[name]["volumes"])


@pytest.mark.parametrize(
    "service", ["migrate", "beat", "planner", "worker-default", "worker-gpu", "flower"]
)
def test_every_command_the_compose_file_runs_exists(compose: dict[str, Any], service: str) -> None:
    command = our_commands(compose)[service]
    executable = shutil.which(command[0])
    assert executable, f"{command[0]} is not installed"
    args = [re.sub(r"\$\{(\w+)[^}]*\}", r"placeholder", arg) for arg in command[1:]]
    done = subprocess.run(
        [executable, *args, "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{service}: {command}\n{done.stdout}\n{done.stderr}"
    assert "Usage" in done.stdout or "usage" in done.stdout


def test_the_dockerfile_copies_what_exists() -> None:
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source


def test_the_image_user_owns_every_named_volume_the_scheduler_mounts(
    compose: dict[str, Any],
) -> None:
    # A named volume mounted where the image has no folder is created root-owned:
    # beat could not write its schedule, nor a job its outputs.
    dockerfile = (ROOT / "Dockerfile").read_text()
    owned = dockerfile.split("chown dcm:dcm", 1)[1].splitlines()[0].split()
    scheduler = compose["x-scheduler"]
    for volume in scheduler["volumes"]:
        source, target = volume.split(":")[:2]
        if not source.startswith((".", "/")):  # a named volume
            assert target in owned, target


def test_orthanc_s_unauthenticated_rest_api_is_not_published_beyond_the_host(
    compose: dict[str, Any],
) -> None:
    ports = compose["services"]["orthanc"]["ports"]
    assert "127.0.0.1:8042:8042" in ports and "8042:8042" not in ports


def test_a_plain_worker_consumes_planning_and_default() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from scheduler.celery_app import app; "
            "print(sorted(q.name for q in app.conf.task_queues))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "['dcm.planning', 'default']"


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path → repository path of each ``./`` mount of a service."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_mode = volume.split(":")
        if source.startswith("./"):
            mounts[target] = ROOT / source
    return mounts


def test_prometheus_scrapes_the_api_with_its_token(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    mounts = bind_mounts(prometheus)
    assert all(path.exists() for path in mounts.values()), mounts
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    [target] = [t for group in job["static_configs"] for t in group["targets"]]
    host, port = target.split(":")
    api = services[host]["command"]
    assert api[:2] == ["dcm-scheduler", "serve"]
    assert api[api.index("--port") + 1] == port
    # The api listens on 0.0.0.0, where reads need the token: the secret.
    assert api[api.index("--host") + 1] == "0.0.0.0"
    [secret] = prometheus["secrets"]
    assert job["authorization"]["credentials_file"] == f"/run/secrets/{secret}"
    assert compose["secrets"][secret] == {"environment": "DCM_API_TOKEN"}


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(
    compose: dict[str, Any],
) -> None:
    grafana = compose["services"]["grafana"]
    mounts = bind_mounts(grafana)
    assert all(path.exists() for path in mounts.values()), mounts
    provisioning = mounts["/etc/grafana/provisioning"]
    [datasources] = (provisioning / "datasources").glob("*.yml")
    [source] = yaml.safe_load(datasources.read_text())["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    [providers] = (provisioning / "dashboards").glob("*.yml")
    [provider] = yaml.safe_load(providers.read_text())["providers"]
    folder = mounts[provider["options"]["path"]]
    dashboard = json.loads((folder / "dcm-scheduler.json").read_text())
    uids = {
        target["datasource"]["uid"]
        for panel in dashboard["panels"]
        for target in [panel, *panel["targets"]]
    }
    assert uids == {source["uid"]}
