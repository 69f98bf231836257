"""GuestConnection.connect against a real asyncssh server behind a forward that swallows
the first connection, as passt does with a SYN it sent before it knew the guest's MAC:
the host's TCP connect succeeds, and nothing ever answers on it."""

from __future__ import annotations

import asyncio
import contextlib

import asyncssh
import pytest

from localsbx.errors import GuestError
from localsbx.guest.ssh import GuestConnection


class _Server(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True


async def _black_hole_then_forward(target_port: int, swallowed: list):
    """A TCP listener on 127.0.0.1: its first connection is accepted and left silent
    (kept open), later ones are spliced to ``target_port``."""

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        with contextlib.suppress(OSError):
            w.close()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if not swallowed:
            swallowed.append(w)
            return
        tr, tw = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(r, tw), pipe(tr, w))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@contextlib.asynccontextmanager
async def _setup(tmp_path):
    """A real asyncssh server behind the swallowing forward; yields ``(server, conn,
    swallowed)`` with ``conn`` pinned to the server's host key, and closes it all after."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "authorized_keys").write_bytes(client_key.export_public_key())
    server = await asyncssh.create_server(
        _Server, "127.0.0.1", 0, server_host_keys=[host_key],
        authorized_client_keys=str(tmp_path / "authorized_keys"))
    swallowed: list = []
    fwd = await _black_hole_then_forward(server.sockets[0].getsockname()[1], swallowed)
    conn = GuestConnection("127.0.0.1", fwd.sockets[0].getsockname()[1], client_key, host_key)
    try:
        yield server, conn, swallowed
    finally:
        await conn.close()
        fwd.close()
        server.close()
        for w in swallowed:
            w.close()


@pytest.mark.asyncio
async def test_a_short_first_try_gets_past_a_connection_nothing_answers(tmp_path):
    async with _setup(tmp_path) as (_, conn, swallowed):
        await conn.connect(timeout=6.0, first_try=0.5)
        assert conn.connected
        assert len(swallowed) == 1  # the first connection was the silent one


@pytest.mark.asyncio
async def test_without_a_first_try_limit_the_silent_connection_takes_the_whole_budget(tmp_path):
    async with _setup(tmp_path) as (_, conn, swallowed):
        with pytest.raises(GuestError, match="cannot reach the guest's SSH server"):
            await conn.connect(timeout=1.5)
        assert not conn.connected and len(swallowed) == 1


@pytest.mark.asyncio
async def test_another_host_key_fails_at_once_instead_of_being_retried(tmp_path):
    async with _setup(tmp_path) as (server, conn, _):
        other = GuestConnection("127.0.0.1", server.sockets[0].getsockname()[1],
                                conn._client_key, asyncssh.generate_private_key("ssh-ed25519"))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(GuestError, match="another host key than the pinned one"):
            await other.connect(timeout=30.0)
        assert loop.time() - t0 < 20  # one try, not retries until the 30 s budget is spent
