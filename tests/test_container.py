"""The image and the deployment examples, tested as far as a machine without Docker allows.

No container engine runs here, so the image itself is never built. What can be tested is what
the image would run: the Dockerfile's ENTRYPOINT and CMD, as its USER, with its ENV and nothing
else for config, from a read-only code directory, with the data in the volume directory. The
Compose and Kubernetes examples are checked against the Dockerfile and the relay's config keys.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.config import RuntimeConfig, read_layers
from tests.conftest import DEADLINE, ROOT, Upstream, free_port, make_message, send
from tests.mta import require_program, unavailable

EXAMPLES = ROOT / "examples"


@dataclass
class Stage:
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, name: str) -> list[str]:
        return [args for op, args in self.instructions if op == name]

    def last(self, name: str) -> str:
        found = self.all(name)
        assert found, f"the final stage has no {name}"
        return found[-1]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                name, _, value = item.partition("=")
                env[name] = value
        return env

    def exec_form(self, name: str) -> list[str]:
        args = self.last(name)
        if name == "HEALTHCHECK":
            args = args.split(" CMD ", 1)[1]
        value = json.loads(args)  # exec form, or the signal would go to a shell
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
        return value


def dockerfile_stages(path: Path = ROOT / "Dockerfile") -> list[Stage]:
    stages: list[Stage] = []
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        op, _, args = logical.partition(" ")
        logical = ""
        if op.upper() == "FROM":
            stages.append(Stage(args.split()[0]))
        else:
            stages[-1].instructions.append((op.upper(), " ".join(args.split())))
    return stages


@pytest.fixture(scope="module")
def image() -> Stage:
    return dockerfile_stages()[-1]


def test_dockerfile_is_multi_stage_slim_wheel_only_non_root(image: Stage) -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    assert image.base.startswith("python:") and image.base.endswith("-slim")
    # The final stage gets wheels from the build stage and never the source tree.
    copies = image.all("COPY")
    assert copies and all(c.startswith("--from=") for c in copies), copies
    assert any("--no-index" in run for run in image.all("RUN"))
    uid, _, gid = image.last("USER").partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0
    assert json.loads(image.last("VOLUME")) == ["/var/lib/dedup-relay"]
    assert image.last("EXPOSE").split() == ["2525", "9025"]
    assert image.exec_form("HEALTHCHECK")[1:] == ["health"]
    assert image.last("STOPSIGNAL") == "SIGTERM"
    env = image.env()
    assert env["RELAY_STORE__PATH"].startswith("/var/lib/dedup-relay/")
    assert env["RELAY_HTTP__LISTEN"] == "0.0.0.0:9025"


def test_image_env_is_valid_config_on_its_own(image: Stage) -> None:
    config = read_layers(None, image.env()).config(check_paths=False)
    assert config.store.path == "/var/lib/dedup-relay/relay.db"
    assert config.listen.host == "127.0.0.1"  # SMTP stays on the shared loopback
    assert config.runtime.log_format == "json"


# --- the image's command, run as its user --------------------------------------


def _traversable(path: Path) -> bool:
    return bool(path.stat().st_mode & 0o001)


class Sandbox:
    """Runs commands as the image's uid, with this interpreter reachable by that uid.

    Test machines often keep Python under /root (mode 700). Then the command runs in a private
    mount namespace where that one directory is replaced by a world-readable tmpfs holding
    only the interpreter's directory, bound back in at the same path.
    """

    def __init__(self, uid: int, gid: int, scratch: Path) -> None:
        require_program("setpriv", "util-linux")
        if os.geteuid() != 0:
            unavailable("switching to the image's uid needs root (setpriv)")
        self.python = os.path.realpath(sys.executable)
        self.argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
        prefix = Path(sys.base_prefix).resolve()
        blocked = [p for p in prefix.parents if p != Path("/") and not _traversable(p)]
        if not blocked:
            return
        if len(blocked) > 1:
            unavailable(f"the interpreter under {prefix} is behind several private directories")
        require_program("unshare", "util-linux")
        hidden = blocked[0]
        child = prefix.relative_to(hidden).parts[0]
        keep = scratch / "keep"
        keep.mkdir()
        script = (
            'set -e; mount --bind "$1/$2" "$3"; mount -t tmpfs -o mode=0755 tmpfs "$1";'
            ' mkdir "$1/$2"; mount --bind "$3" "$1/$2"; shift 3; exec "$@"'
        )
        self.argv = [
            *("unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"),
            *(str(hidden), child, str(keep)),
            *self.argv,
        ]

    def popen(self, argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*self.argv, *argv],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(
        self, argv: list[str], env: dict[str, str], cwd: Path
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.argv, *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
        )


def console_script(name: str, bin_dir: Path) -> Path:
    """The launcher pip writes for a [project.scripts] entry, as the image's pip would."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert name in scripts, f"ENTRYPOINT {name} is not a console script of the project"
    module, _, function = scripts[name].partition(":")
    path = bin_dir / name
    path.write_text(
        f"#!{Path(sys.executable).resolve()}\n"
        f"import sys\nfrom {module} import {function}\n"
        f"if __name__ == '__main__':\n    sys.exit({function}())\n"
    )
    path.chmod(0o555)
    return path


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="relay-image-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for root, dirs, _ in os.walk(path):
            for name in dirs:
                (Path(root) / name).chmod(0o755)
        shutil.rmtree(path)


def read_until_listening(process: subprocess.Popen[str]) -> list[dict[str, Any]]:
    assert process.stderr is not None
    records: list[dict[str, Any]] = []
    while True:
        line = process.stderr.readline()
        if not line:
            raise AssertionError(f"the relay exited during start: {records}")
        records.append(json.loads(line))  # the image's ENV asks for JSON logs
        if "listening on" in records[-1]["message"]:
            return records


async def test_image_command_runs_unprivileged_from_read_only_code_with_env_only_config(
    image: Stage, scratch: Path, upstream: Upstream
) -> None:
    uid, _, gid = image.last("USER").partition(":")
    sandbox = Sandbox(int(uid), int(gid), scratch)
    volume = json.loads(image.last("VOLUME"))[0]

    code = scratch / "code"
    shutil.copytree(
        ROOT / "relay", code / "lib" / "relay", ignore=shutil.ignore_patterns("__pycache__")
    )
    (code / "bin").mkdir()
    entrypoint = image.exec_form("ENTRYPOINT")
    console_script(entrypoint[0], code / "bin")
    for root, dirs, files in os.walk(code):
        for name in files:
            (Path(root) / name).chmod(0o444 if name != entrypoint[0] else 0o555)
        for name in dirs:
            (Path(root) / name).chmod(0o555)
    code.chmod(0o555)
    before = sorted(p.relative_to(code) for p in code.rglob("*"))

    data = scratch / "volume"
    data.mkdir()
    os.chown(data, int(uid), int(gid))
    assert image.last("WORKDIR") == volume

    smtp_port, http_port = free_port(), free_port()
    env = {
        "PATH": f"{code / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(code / "lib"),
        # The image's ENV, with the volume where this test keeps it.
        **{k: v.replace(volume, str(data)) for k, v in image.env().items()},
        # What an operator adds with `docker run -e`: loopback ports and a real upstream.
        "RELAY_LISTEN__PORT": str(smtp_port),
        "RELAY_HTTP__LISTEN": f"127.0.0.1:{http_port}",
        "RELAY_UPSTREAM__URL": f"smtp://127.0.0.1:{upstream.port}",
    }
    command = [*entrypoint, *image.exec_form("CMD")]
    process = sandbox.popen(command, env, data)
    try:
        records = await asyncio.to_thread(read_until_listening, process)
        assert f":{smtp_port}" in records[-1]["message"]

        healthcheck = image.exec_form("HEALTHCHECK")
        health = await asyncio.to_thread(sandbox.run, healthcheck, env, data)
        assert health.returncode == 0, health.stdout + health.stderr
        assert health.stdout.startswith("healthy: ready"), health.stdout

        reply = await send(smtp_port, make_message("from the sidecar"))
        assert reply.code == 250, reply.text
        delivered = await upstream.wait_for(1)
        assert b"from the sidecar" in delivered[0].data

        store = Path(env["RELAY_STORE__PATH"])
        assert store.parent == data
        assert (await asyncio.to_thread(store.stat)).st_uid == int(uid)
        which = await asyncio.to_thread(
            sandbox.run,
            [sandbox.python, "-c", "import relay; print(relay.__file__)"],
            env,
            data,
        )
        assert which.stdout.strip() == str(code / "lib" / "relay" / "__init__.py"), which

        process.send_signal(signal.SIGTERM)
        grace = RuntimeConfig.shutdown_grace
        status = await asyncio.to_thread(process.wait, grace + 3)
        assert status == 0, process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    assert sorted(p.relative_to(code) for p in code.rglob("*")) == before  # nothing written


# --- the examples ----------------------------------------------------------------


def _env_list(items: list[dict[str, Any]]) -> dict[str, str]:
    return {item["name"]: str(item.get("value", "")) for item in items if "value" in item}


def test_compose_example_runs_the_relay_as_the_apps_sidecar(image: Stage) -> None:
    compose = yaml.safe_load((EXAMPLES / "compose.yaml").read_text())
    services = compose["services"]
    relay, app = services["relay"], services["app"]
    assert relay["network_mode"] == "service:app"
    assert app["environment"] == {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": "2525"}
    env = {**image.env(), **relay["environment"]}
    config = read_layers(None, env).config(check_paths=False)
    assert relay["volumes"] == ["relay-data:" + json.loads(image.last("VOLUME"))[0]]
    grace = float(relay["stop_grace_period"].rstrip("s"))
    assert grace > config.runtime.shutdown_grace
    scrape = yaml.safe_load((EXAMPLES / "prometheus" / "prometheus.yml").read_text())
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"app:{config.http.port}"]


def test_kubernetes_example_wires_probes_volume_and_user_to_the_image(image: Stage) -> None:
    documents = list(
        yaml.safe_load_all((EXAMPLES / "kubernetes" / "relay-sidecar.yaml").read_text())
    )
    pod = documents[0]["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False
    relay = next(c for c in pod["initContainers"] if c["name"] == "relay")
    assert relay["restartPolicy"] == "Always"  # a native sidecar
    env = {**image.env(), **_env_list(relay["env"])}
    env["RELAY_UPSTREAM__PASSWORD_ENV"] = ""  # the secret itself comes from the cluster
    config = read_layers(None, env).config(check_paths=False)
    port = {p["name"]: p["containerPort"] for p in relay["ports"]}["relay-http"]
    assert port == config.http.port
    assert relay["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "relay-http"}
    assert relay["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "relay-http"}
    assert relay["readinessProbe"]["timeoutSeconds"] > 2  # the store write may take 2s
    uid, _, gid = image.last("USER").partition(":")
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
        int(uid),
        int(gid),
    )
    mounts = {m["name"]: m["mountPath"] for m in relay["volumeMounts"]}
    assert mounts["relay-data"] == json.loads(image.last("VOLUME"))[0]
    assert pod["terminationGracePeriodSeconds"] > config.runtime.shutdown_grace
    app = next(c for c in pod["containers"] if c["name"] == "app")
    assert _env_list(app["env"]) == {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": "2525"}
    claim = yaml.safe_load((EXAMPLES / "kubernetes" / "relay-data.yaml").read_text())
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["relay-data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_prometheus_example_and_alert_rules_pass_promtool() -> None:
    promtool = require_program("promtool", "prometheus")
    folder = EXAMPLES / "prometheus"
    for args in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ):
        result = subprocess.run(
            [promtool, *args], cwd=folder, capture_output=True, text=True, timeout=DEADLINE
        )
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
