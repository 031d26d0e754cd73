"""Operating a PostgreSQL store: the password, `migrate`, and the operator's commands.

The relay is `python -m relay serve` on a private cluster (tests/pg.py), the commands run as
separate processes against the same database, as an operator runs them on another host.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.config import from_mapping
from relay.store import RecipientUpdate, Update, open_store
from relay.store.postgres import PostgresStore
from tests.conftest import (
    BACKENDS,
    DEADLINE,
    PG_PASSWORD_ENV,
    RelayProcess,
    Upstream,
    cli,
    eventually,
    free_port,
    make_message,
    queued_id,
    repeat_id,
    send,
    submission,
)


def write_config(tmp_path: Path, store: dict[str, Any], **sections: Any) -> Path:
    path = tmp_path / "ops.yaml"
    path.write_text(yaml.safe_dump({"store": store, **sections}))
    return path


# --- the password ------------------------------------------------------------


async def test_the_password_comes_from_a_file_an_env_var_or_libpq_and_never_shows(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = os.environ[PG_PASSWORD_ENV]
    monkeypatch.delenv(PG_PASSWORD_ENV)
    secret = tmp_path / "pg-password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)

    from_file = await cli(
        write_config(tmp_path, {"url": pg_url, "password_file": str(secret)}), "migrate"
    )
    assert from_file.code == 0, from_file.err
    from_env = await cli(
        write_config(tmp_path, {"url": pg_url, "password_env": "OPS_PG_PASSWORD"}),
        "migrate",
        env={"OPS_PG_PASSWORD": password},
    )
    assert from_env.code == 0, from_env.err
    from_libpq = await cli(
        write_config(tmp_path, {"url": pg_url}), "stats", env={"PGPASSWORD": password}
    )
    assert from_libpq.code == 0, from_libpq.err

    wrong = await cli(
        write_config(tmp_path, {"url": pg_url, "password_env": "OPS_PG_PASSWORD"}),
        "migrate",
        env={"OPS_PG_PASSWORD": "not-" + password},
    )
    assert wrong.code != 0
    assert "password authentication failed" in wrong.err
    assert "Traceback" not in wrong.err
    assert password not in wrong.out + wrong.err


def test_a_password_in_the_url_is_refused_with_where_to_put_it() -> None:
    from relay.errors import ConfigError

    with pytest.raises(ConfigError, match=r"password_env or store\.password_file"):
        from_mapping({"store": {"url": "postgresql://relay:hunter2@127.0.0.1/relay"}})


async def test_a_list_of_hosts_finds_the_one_that_takes_writes(pg_url: str, tmp_path: Path) -> None:
    """As after a failover: the first host is gone, the URL names the next."""
    dead = free_port()
    hosts = pg_url.replace("@127.0.0.1:", f"@127.0.0.1:{dead},127.0.0.1:", 1)
    url = f"{hosts}?target_session_attrs=read-write&connect_timeout=5"
    run = await cli(
        write_config(tmp_path, {"url": url, "password_env": PG_PASSWORD_ENV}), "migrate"
    )
    assert run.code == 0, run.err
    assert "schema version 0 ->" in run.out


# --- migrate -----------------------------------------------------------------


@pytest.mark.parametrize("store_backend", BACKENDS, indirect=True)
async def test_migrate_creates_the_schema_once_and_serve_finds_it_current(
    store_config: dict[str, Any], tmp_path: Path
) -> None:
    config = write_config(tmp_path, store_config)
    first, second = await cli(config, "migrate"), None
    assert first.code == 0, first.err
    assert "schema version 0 ->" in first.out
    second = await cli(config, "migrate")
    assert second.code == 0, second.err
    assert "up to date" in second.out
    # A store the relay opens is the one `migrate` made: no step is applied twice.
    store = open_store(from_mapping({"store": store_config}, check_paths=False).store)
    await store.open()
    await store.close()
    third = await cli(config, "migrate")
    assert third.out == second.out


# --- log, show, stats, requeue and purge -------------------------------------


async def test_log_show_stats_requeue_and_purge_answer_from_postgres(
    pg_url: str,
    tmp_path: Path,
    upstream: Upstream,
    relay_process: Callable[..., RelayProcess],
) -> None:
    store = {"url": pg_url, "password_env": PG_PASSWORD_ENV}
    relay = relay_process(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "upstream": {"url": f"smtp://127.0.0.1:{upstream.port}", "timeout": "5s"},
            "store": store,
            "delivery": {"on_ambiguous": "hold", "retry_initial": "100ms"},
            "dedupe": {"window": "1s"},
            "audit": {"output": "none"},
            "runtime": {"instance": "ops"},
        }
    )
    relay.start()
    relay.drain_stderr()
    config = write_config(tmp_path, store, audit={"retention": "1s"})

    upstream.script.drop_after_data = 1  # the first copy's reply never comes: ambiguous, held
    data = make_message(message_id="<order-1@shop.example>")
    queue_id = queued_id(await send(relay.port, data))
    assert repeat_id(await send(relay.port, data)) != queue_id  # dropped, not forwarded

    async def held() -> bool:
        run = await cli(config, "show", queue_id, "--json")
        return run.code == 0 and "held" in run.out

    await eventually(held, timeout=DEADLINE * 2, what="the message to be held")
    assert upstream.messages == []

    requeued = await cli(config, "requeue", queue_id)
    assert requeued.code == 0, requeued.err
    assert f"{queue_id}: 1 recipient(s) queued again" in requeued.out
    await upstream.wait_for(1)
    again = await cli(config, "requeue", queue_id)
    assert again.code == 1 and "nothing held" in again.err

    log = await cli(config, "log", "--json", "--message-id", "order-1@shop.example")
    assert log.code == 0, log.err
    events = [json.loads(line)["event"] for line in log.out.splitlines()]
    assert events[0] == "received" and "ambiguous" in events and events[-1] == "delivered"
    show = await cli(config, "show", "<order-1@shop.example>")
    assert show.code == 0 and queue_id in show.out and "delivered" in show.out
    stats = await cli(config, "stats", "--json")
    assert stats.code == 0, stats.err
    figures = json.loads(stats.out)
    assert {k: figures["events"][k] for k in ("received", "ambiguous", "delivered")} == {
        "received": 1,
        "ambiguous": 1,
        "delivered": 1,
    }
    assert figures["duplicates_by_strategy"] == {"message-id": 1}
    assert figures["pending"] == 0 and figures["latency"]["count"] == 1

    assert relay.terminate() == 0

    async def purged() -> bool:
        run = await cli(config, "purge")
        assert run.code == 0, run.err
        return run.out.startswith("1 claims")

    await eventually(purged, what="the expired claim to be purged")
    gone = await cli(config, "log", "--json", "--message-id", "order-1@shop.example")
    assert gone.code == 0 and gone.out == ""


# --- LISTEN/NOTIFY -----------------------------------------------------------


async def test_an_idle_replica_hears_at_once_of_mail_spooled_or_requeued_on_another(
    pg_url: str,
) -> None:
    config = from_mapping(
        {"store": {"url": pg_url, "password_env": PG_PASSWORD_ENV}}, check_paths=False
    ).store
    idle, busy = PostgresStore(config), PostgresStore(config)
    woken = asyncio.Event()
    idle.subscribe(woken.set)
    await idle.open()
    await busy.open()
    try:
        # Once as it starts to LISTEN (for what was notified before); from then on, by NOTIFY.
        await asyncio.wait_for(woken.wait(), DEADLINE)
        woken.clear()
        await busy.accept(submission("SPOOLED"))
        await asyncio.wait_for(woken.wait(), DEADLINE)

        now = 1_800_000_000.0
        (lease,) = (await busy.lease("busy", 10, now, 600.0)).leases
        held = RecipientUpdate("alice@example.org", "held", "ambiguous", None, "reply lost")
        await busy.update(Update(lease.queue_id, (held,), None, None, None, now))
        woken.clear()
        assert await busy.requeue("SPOOLED", now) == 1
        await asyncio.wait_for(woken.wait(), DEADLINE)
    finally:
        await idle.close()
        await busy.close()
