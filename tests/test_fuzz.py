"""A short fuzz of the SMTP command and DATA parser (bench/fuzz.py runs the long one).

The relay runs as a real process. For each random session it must answer every
command, never crash, never say 250 for a message it did not store, and keep
serving a second session opened before the random input.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings

from tests.conftest import RelayProcess, base_config, deep_merge, free_port
from tests.smtp_fuzz import Session, check_stored, send_control, sessions


def fuzz_config(tmp_path: Path) -> dict[str, Any]:
    return deep_merge(
        base_config(tmp_path, 25),
        {
            "listen": {"port": free_port(), "max_message_size": "64KB"},
            "upstream": {"url": f"maildir:{tmp_path / 'maildir'}"},
            "dedupe": {"keys": ["header:Idempotency-Key", "message-id", "fingerprint"]},
        },
    )


def test_random_sessions_never_crash_never_lie_and_never_stop_the_others(
    tmp_path: Path, relay_process: Callable[[dict[str, Any]], RelayProcess]
) -> None:
    relay = relay_process(fuzz_config(tmp_path))
    relay.start()
    relay.drain_stderr()  # bogus commands are logged; an unread pipe would stall the relay
    assert relay.proc is not None
    controls = itertools.count()
    promised: list[str] = []

    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(steps=sessions)
    def one_session(steps: list[Any]) -> None:
        control = Session(relay.port)
        try:
            fuzz = Session(relay.port)
            try:
                assert fuzz.greeting.startswith("220")
                promised.extend(fuzz.run(steps).stored)
            finally:
                fuzz.close()
            promised.append(_queue_id(send_control(control, next(controls))))
        finally:
            control.close()
        assert relay.proc is not None and relay.proc.poll() is None, "the relay died"

    one_session()
    check_stored(tmp_path / "relay.db", promised)
    assert relay.terminate() == 0


def _queue_id(reply: str) -> str:
    return reply.split("queued as ", 1)[1].split()[0] if "queued as" in reply else reply
