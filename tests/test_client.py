"""The Python client against a real server: both flavours, errors as the server's classes."""

from __future__ import annotations

import asyncio

import pytest

from sandboxd.client import AsyncSandboxd, BadRequest, NotFound, NotImplementedYet, Sandboxd, Unauthorized


@pytest.fixture
def client(server):
    with Sandboxd(server.url, server.keys["alice"]) as sandboxd:
        yield sandboxd


def test_sync_client_round_trip(client):
    with client.create(metadata={"tag": "sdk"}, env_vars={"GREETING": "hi"}) as sbx:
        assert sbx.vm_id.startswith("sbx_") and sbx.endpoint.startswith("http://")
        result = sbx.exec("echo $GREETING; echo oops >&2; exit 4")
        assert (result.stdout, result.stderr, result.exit_code) == ("hi\n", "oops\n", 4)
        sbx.write_file("notes/a.bin", b"\x00\x01binary")
        assert sbx.read_file("notes/a.bin") == b"\x00\x01binary"
        assert [entry["name"] for entry in sbx.list_files("notes")] == ["a.bin"]
        assert [entry["text"] for entry in sbx.logs(limit=2)] == ["hi", "oops"]
        assert sbx.vm_id in {info.vm_id for info in client.list()}
        assert sbx.info()["metadata"] == {"tag": "sdk"}
    assert client.get(sbx.vm_id).state == "destroyed"


def test_errors_are_the_servers_classes(client, server):
    with pytest.raises(BadRequest) as bad:
        client.create(env_vars={"LD_PRELOAD": "x"})
    assert bad.value.code == "reserved_env_var" and bad.value.field == "env_vars" and bad.value.status == 400
    with pytest.raises(NotImplementedYet):
        client.create("windows")
    with pytest.raises(NotFound):
        client.get("sbx_00000000")
    with pytest.raises(Unauthorized), Sandboxd(server.url, "sbd_wrong") as stranger:
        stranger.list()


def test_async_client_round_trip(server):
    async def go():
        async with AsyncSandboxd(server.url, server.keys["alice"]) as client:
            async with await client.create() as sbx:
                assert (await sbx.exec("echo async")).output == "async\n"
                await sbx.write_file("x.txt", b"data")
                assert await sbx.read_file("x.txt") == b"data"
            return (await client.get(sbx.vm_id)).state

    assert asyncio.run(go()) == "destroyed"


def test_api_key_is_required(monkeypatch):
    monkeypatch.delenv("SANDBOXD_API_KEY", raising=False)
    with pytest.raises(ValueError, match="API key"):
        Sandboxd("http://127.0.0.1:1")
