"""The second field guide's cause 3, gRPC max_concurrent_streams, on a real node (issue 12).

The guide says containerd stalls new requests once a configured ``[grpc] max_concurrent_streams``
is reached. containerd has no such key (its [grpc] table in 1.6 to 2.x: address, tcp_*, uid, gid,
max_recv/send_message_size), so it ignores it. Measured here: with the key at 2, one gRPC
connection holding four event streams (Events.Subscribe, each proven live by an event it received)
still gets a Version answered on that same connection. nodemedic reports the key as not in effect
(value and advice in the record), and the hang rule, whose probe keeps being answered, stays quiet;
in enforce and in observe mode alike, and nothing is acted on.
"""

from __future__ import annotations

import json
import time

import pytest
from lab.faults import SOCKET, containerd_serving, records, start_nodemedic, wait_for
from lab.image import VENV
from lab.node import Node

pytestmark = pytest.mark.system
CONFIG = "/etc/containerd/config.toml"
LIMIT = 2
HELD = 4  # twice the configured limit, on one connection
VERDICT = "/root/streams.json"
# One channel (one HTTP/2 connection) holds HELD Subscribe streams; ctr publishes namespace events
# until every stream has received one (so each is open on containerd's side); then a Version call
# on the same channel tells whether containerd limits streams. The streams stay held afterwards.
HOLDER = """import asyncio, json, os, subprocess, grpc
SOCK, HELD, OUT = {sock!r}, {held}, {out!r}
got = [0] * HELD
def same(b):
    return b
async def hold(stream, i):
    async for _ in stream:
        got[i] += 1
def connections():
    # containerd's ends (ss: local SOCK) whose peer is one of this process's sockets
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            mine.add(os.readlink(f"/proc/self/fd/{{fd}}").removeprefix("socket:[").rstrip("]"))
        except OSError:  # the listing's own fd, closed since
            pass
    ss = subprocess.run(["ss", "-xnH"], capture_output=True, text=True, check=True).stdout
    ends = [line.split() for line in ss.splitlines()]
    return sum(1 for e in ends if len(e) >= 8 and e[4] == SOCK and e[7] in mine)
async def main():
    channel = grpc.aio.insecure_channel("unix://" + SOCK)
    subscribe = channel.unary_stream("/containerd.services.events.v1.Events/Subscribe",
                                     request_serializer=same, response_deserializer=same)
    tasks = [asyncio.create_task(hold(subscribe(b""), i)) for i in range(HELD)]
    n = 0
    while not all(got):
        n += 1
        subprocess.run(["ctr", "namespaces", "create", f"streams-{{n}}"], check=True)
        await asyncio.sleep(0.5)
    version = channel.unary_unary("/containerd.services.version.v1.Version/Version",
                                  request_serializer=same, response_deserializer=same)
    try:
        await version(b"", timeout=10)
        verdict = "answered"
    except grpc.aio.AioRpcError as exc:
        verdict = exc.code().name
    with open(OUT, "w") as f:
        json.dump({{"live_streams": sum(1 for g in got if g), "connections": connections(),
                   "version_on_same_connection": verdict}}, f)
    await asyncio.gather(*tasks)
asyncio.run(main())
"""


def set_stream_limit(node: Node, limit: int) -> None:
    """config.toml with ``[grpc] max_concurrent_streams = limit``, containerd restarted on it."""
    text = node.run("cat", CONFIG).stdout
    node.write_file(CONFIG, f"{text}\n[grpc]\n  max_concurrent_streams = {limit}\n")
    node.run("systemctl", "restart", "containerd.service")
    wait_for(lambda: containerd_serving(node), 30, "containerd serving with the stream limit set")


def hold_streams(node: Node) -> dict[str, object]:
    """HELD streams held on one connection by a helper unit; its verdict once all are live."""
    node.write_file("/root/hold_streams.py", HOLDER.format(sock=SOCKET, held=HELD, out=VERDICT))
    node.run("systemd-run", "--unit=stream-holder", f"{VENV}/bin/python", "/root/hold_streams.py")
    read = lambda: node.sh(f"cat {VERDICT}", check=False).stdout  # noqa: E731
    try:
        found = wait_for(read, 60, "the stream holder's verdict")
    except TimeoutError:
        print(node.sh("journalctl -u stream-holder --no-pager", check=False).stdout)
        raise
    verdict: dict[str, object] = json.loads(str(found))
    return verdict


@pytest.mark.parametrize("mode", ["enforce", "observe"])
def test_a_stream_limit_is_reported_as_not_in_effect_never_as_a_hang(node: Node, mode: str) -> None:
    set_stream_limit(node, LIMIT)
    pid = node.unit_property("containerd.service", "MainPID")
    verdict = hold_streams(node)
    assert verdict == {"live_streams": HELD, "connections": 1, "version_on_same_connection": "answered"}, (
        f"containerd 1.6 ignores [grpc] max_concurrent_streams = {LIMIT}: {HELD} streams held on one "
        "connection and another request on it is still answered"
    )
    start_nodemedic(node, mode=mode)
    [reported] = wait_for(lambda: records(node, rule="containerd-grpc-streams", outcome="reported"), 30,
                          "the grpc-streams report")  # fmt: skip
    assert f"max_concurrent_streams = {LIMIT}" in reported["NODEMEDIC_TRIGGER"], "the record has the value"
    assert "remove max_concurrent_streams" in reported["NODEMEDIC_DETAIL"], "and says what to do"
    time.sleep(5)  # 20 probe intervals: a hang would have been seen twice over
    assert records(node, rule="containerd-hung") == [], "streams held are no hang: the probe is answered"
    assert len(records(node, rule="containerd-grpc-streams", outcome="reported")) == 1, "once"
    assert records(node, rule="containerd-grpc-streams", kind="action") == [], "report only"
    assert node.unit_property("containerd.service", "MainPID") == pid, "containerd was not restarted"
    assert containerd_serving(node)
    assert node.unit_property("stream-holder.service", "ActiveState") == "active", "streams still held"
