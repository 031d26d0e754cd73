"""Never an open relay: probes from a second loopback address, and every example config.

127.0.0.2 plays the stranger: listen.networks is [127.0.0.1/32], so it is outside.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import yaml

from relay.config import ConfigError, from_mapping
from tests.conftest import (
    OUTSIDER,
    PASSWORD,
    ROOT,
    Certificates,
    Dialog,
    RelayFactory,
    Upstream,
    base_config,
    deep_merge,
    make_message,
    plain,
    secure_config,
    send,
    send_authenticated,
    write_users,
)
from tests.mta import swaks


async def test_without_auth_a_stranger_is_refused_at_connect(
    make_relay: RelayFactory, upstream: Upstream
) -> None:
    relay = await make_relay(listen={"networks": ["127.0.0.1/32"]})
    with pytest.raises(aiosmtplib.SMTPConnectResponseError) as refused:
        await send(relay.port, make_message(), source=OUTSIDER, rcpts=("victim@example.net",))
    assert refused.value.code == 554
    result = await asyncio.to_thread(
        swaks,
        "--server", f"127.0.0.1:{relay.port}",
        "--local-interface", OUTSIDER,
        "--from", "spammer@example.com",
        "--to", "victim@example.net",
    )  # fmt: skip
    assert result.returncode != 0
    assert await relay.rows("SELECT count(*) FROM messages") == [(0,)]


async def test_with_auth_a_stranger_sends_only_after_a_successful_login(
    make_relay: RelayFactory,
    upstream: Upstream,
    tmp_path: Path,
    certificates: Certificates,
) -> None:
    relay = await make_relay(**secure_config(tmp_path, certificates))
    from tests.conftest import client_context

    dialog, _ = await Dialog.open(relay.port, source=OUTSIDER)
    await dialog.command("EHLO probe.test")
    assert (await dialog.command("MAIL FROM:<spammer@example.com>")).startswith("530 5.7.0")
    assert (await dialog.command("RCPT TO:<victim@example.net>")).startswith("503")
    assert (await dialog.command("DATA")).startswith("503")
    await dialog.starttls(client_context(certificates))
    await dialog.command("EHLO probe.test")
    assert (await dialog.command(plain(password="guess"))).startswith("535")
    assert (await dialog.command("MAIL FROM:<spammer@example.com>")).startswith("530 5.7.0")
    await dialog.close()
    accepted = await send_authenticated(
        relay.port, make_message(), certificates, rcpts=("victim@example.net",)
    )
    assert accepted.code == 250
    [delivered] = await upstream.wait_for(1)
    assert delivered.rcpts == ["victim@example.net"]
    assert await relay.rows("SELECT count(*) FROM messages") == [(1,)]


def test_a_network_as_wide_as_the_internet_is_refused(tmp_path: Path) -> None:
    def load(network: str) -> object:
        return from_mapping(
            {"listen": {"networks": [network]}, "store": {"path": str(tmp_path / "r.db")}}
        )

    for network in ("0.0.0.0/0", "::/0", "0.0.0.0/1", "2000::/3"):
        with pytest.raises(ConfigError, match=re.escape("listen.networks[0]")):
            load(network)
    for private in ("10.0.0.0/8", "fc00::/7", "172.16.0.0/12"):
        load(private)


# --- the example configs ---------------------------------------------------------------------


def example_configs() -> list[tuple[str, dict[str, Any]]]:
    """config/relay.yaml and every YAML block in the README that is a relay config."""
    examples = [("config/relay.yaml", yaml.safe_load((ROOT / "config/relay.yaml").read_text()))]
    readme = (ROOT / "README.md").read_text()
    for n, block in enumerate(re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL)):
        try:
            data = yaml.safe_load(block)
        except yaml.YAMLError:  # docker-compose with ${VARS}: not a relay config
            continue
        if isinstance(data, dict) and "listen" in data:
            examples.append((f"README.md yaml block {n}", data))
    return examples


EXAMPLES = example_configs()


@pytest.mark.parametrize(("source", "example"), EXAMPLES, ids=[s for s, _ in EXAMPLES])
async def test_no_example_config_lets_a_stranger_relay(
    source: str,
    example: dict[str, Any],
    make_relay: RelayFactory,
    upstream: Upstream,
    tmp_path: Path,
    certificates: Certificates,
) -> None:
    listen = example.get("listen") or {}
    # The networks an example trusts are loopback or private, never the world.
    import ipaddress

    for network in listen.get("networks") or ["127.0.0.0/8"]:
        net = ipaddress.ip_network(network, strict=False)
        assert net.is_private or net.is_loopback, (source, network)
    # Run it as written except for what must be local to the test machine, with
    # 127.0.0.1 the only trusted address, and probe from 127.0.0.2.
    local = deep_merge(example, base_config(tmp_path, upstream.port))
    local["listen"] = {
        **listen,
        "host": "127.0.0.1",
        "port": 0,
        "networks": ["127.0.0.1/32"],
    }
    local.pop("rules", None)
    if "tls" in listen:
        local["listen"]["tls"] = {
            **listen["tls"],
            "cert_file": str(certificates.cert_file),
            "key_file": str(certificates.key_file),
            "implicit_port": 0 if listen["tls"].get("implicit_port") is not None else None,
        }
    if "auth" in example:
        users = write_users(tmp_path / "users", {"alice": PASSWORD})
        local["auth"] = {**example["auth"], "users_file": str(users), "users": {}}
    local["upstream"] = base_config(tmp_path, upstream.port)["upstream"]
    local.pop("delivery", None)
    relay = await make_relay(**local)
    for port in filter(None, (relay.port, relay.app.front.implicit_port)):
        tls = None
        if port == relay.app.front.implicit_port:
            from tests.conftest import client_context

            tls = client_context(certificates)
        try:
            dialog, greeting = await Dialog.open(port, source=OUTSIDER, tls=tls)
        except ConnectionError:
            continue
        if greeting.startswith("220"):
            await dialog.command("EHLO probe.test")
            reply = await dialog.command("MAIL FROM:<spammer@example.com>")
            assert reply.startswith("530"), (source, reply)
        else:
            assert greeting.startswith("554"), (source, greeting)
        await dialog.close()
    assert await relay.rows("SELECT count(*) FROM messages") == [(0,)]
