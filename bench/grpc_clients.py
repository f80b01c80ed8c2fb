"""Benchmark: the probe's gRPC client, three ways, against a real containerd in a lab node.

Each client runs in its own Python process (so its RSS is its own) on the host, asking containerd's
Version API over the node's socket (through /proc/LEADER/root) ``--requests`` times, one every
``--interval`` seconds, as the probe does:

- grpcio-per-request: a new grpc.aio channel for every request (nodemedic up to issue 14);
- grpcio-kept: one grpc.aio channel kept, with a short reconnect backoff (100 ms);
- grpclib-kept: one grpclib channel kept (asyncio-native, over the h2 package);
- h2-kept: python-hyper's h2 state machine used directly over one kept asyncio unix connection
  (what replacing grpcwire's framing with h2 would cost; the gRPC framing stays ours);
- nodemedic-wire: nodemedic's ContainerdProbe (sources/grpcwire.py: one kept HTTP/2 connection,
  a pre-encoded request in one write, hpack for the answer's headers, no protobuf).

Figures per request: CPU (user+system of the whole process, all threads) and context switches
(summed over all threads); after the run: VmRSS and the number of threads. The grpcio clients
need grpcio and protobuf, which nodemedic no longer depends on:
`.venv/bin/pip install grpcio protobuf` first (they are skipped otherwise); grpclib is in the
dev dependencies.

    .venv/bin/python bench/grpc_clients.py --requests 400
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

CLIENTS = ("grpcio-per-request", "grpcio-kept", "grpclib-kept", "h2-kept", "nodemedic-wire")
METHOD = "/containerd.services.version.v1.Version/Version"
BACKOFF = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 100),
]


def _switches() -> int:
    total = 0
    for status in Path("/proc/self/task").glob("*/status"):
        total += sum(int(n) for n in re.findall(r"ctxt_switches:\s+(\d+)", status.read_text()))
    return total


def _grpcio_call(channel: Any) -> Any:
    from google.protobuf import empty_pb2

    return channel.unary_unary(METHOD, request_serializer=empty_pb2.Empty.SerializeToString,
                               response_deserializer=lambda b: b)  # fmt: skip


async def _grpcio(socket: str, kept: bool, ask: int, interval: float) -> None:
    import grpc
    from google.protobuf import empty_pb2

    target = f"unix://{socket}"
    channel = grpc.aio.insecure_channel(target, options=BACKOFF) if kept else None
    for _ in range(ask):
        if channel is None:
            async with grpc.aio.insecure_channel(target) as once:
                await _grpcio_call(once)(empty_pb2.Empty(), timeout=1.0)
        else:
            await _grpcio_call(channel)(empty_pb2.Empty(), timeout=1.0)
        await asyncio.sleep(interval)
    if channel is not None:
        await channel.close()


class _RawCodec:
    __content_subtype__ = "proto"

    def encode(self, message: bytes, message_type: type) -> bytes:
        return message

    def decode(self, data: bytes, message_type: type) -> bytes:
        return data


async def _grpclib(socket: str, ask: int, interval: float) -> None:
    from grpclib.client import Channel, UnaryUnaryMethod

    channel = Channel(path=socket, codec=_RawCodec())  # type: ignore[arg-type]
    call = UnaryUnaryMethod[bytes, bytes](channel, METHOD, bytes, bytes)
    for _ in range(ask):
        await call(b"", timeout=1.0)
        await asyncio.sleep(interval)
    channel.close()


H2_REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", METHOD.encode()),
    (b":authority", b"localhost"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]


async def _h2_call(conn: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    import h2.events

    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, H2_REQUEST)
    conn.send_data(stream, b"\x00" * 5, end_stream=True)
    writer.write(conn.data_to_send())
    body = b""
    while True:
        data = await reader.read(65536)
        if not data:
            raise EOFError("closed")
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                writer.write(conn.data_to_send())
                return body[5:]
        writer.write(conn.data_to_send())


async def _h2(socket: str, ask: int, interval: float) -> None:
    import h2.config
    import h2.connection

    reader, writer = await asyncio.open_unix_connection(socket)
    config = h2.config.H2Configuration(client_side=True, header_encoding=None)
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    conn.increment_flow_control_window(1 << 30)
    writer.write(conn.data_to_send())
    for _ in range(ask):
        async with asyncio.timeout(1.0):
            await _h2_call(conn, reader, writer)
        await asyncio.sleep(interval)
    writer.close()


async def _wire(socket: str, ask: int, interval: float) -> None:
    from nodemedic.sources.probe import ContainerdProbe

    probe = ContainerdProbe()
    for _ in range(ask):
        await probe.version(socket, 1.0)
        await asyncio.sleep(interval)
    probe.close()


def client(name: str, socket: str, ask: int, interval: float) -> dict[str, float]:
    """Run in the child: warm up (imports, first connection), then measure ``ask`` requests."""
    runs = {
        "grpclib-kept": lambda n: _grpclib(socket, n, interval),
        "h2-kept": lambda n: _h2(socket, n, interval),
        "nodemedic-wire": lambda n: _wire(socket, n, interval),
    }
    run = runs.get(name, lambda n: _grpcio(socket, name == "grpcio-kept", n, interval))
    asyncio.run(run(3))
    cpu, switches = time.process_time(), _switches()
    asyncio.run(run(ask))
    cpu, switches = time.process_time() - cpu, _switches() - switches
    rss = int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))  # type: ignore[union-attr]
    threads = len(list(Path("/proc/self/task").iterdir()))
    return {"cpu_ms": 1000 * cpu / ask, "switches": switches / ask, "rss_mb": rss / 1024, "threads": threads}


def measure(socket: str, name: str, ask: int, interval: float) -> dict[str, float] | None:
    argv = [sys.executable, __file__, "--client", name, "--socket", socket,
            "--requests", str(ask), "--interval", str(interval)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60 + ask * (interval + 1))
    if done.returncode != 0:
        print(f"{name}: skipped: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--interval", type=float, default=0.05, help="pause between requests (s)")
    parser.add_argument("--client", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        print(json.dumps(client(args.client, args.socket, args.requests, args.interval)))
        return 0
    from lab.node import Node

    with Node.boot() as node:
        socket = f"/proc/{node.leader}/root/run/containerd/containerd.sock"
        load = Path("/proc/loadavg").read_text().split()[0]
        results = {name: measure(socket, name, args.requests, args.interval) for name in CLIENTS}
    print(f"\ncontainerd Version requests, {args.requests} per client, one every {args.interval:g} s "
          f"(containerd 1.6.20 in a lab node; host load {load})")  # fmt: skip
    for name, r in results.items():
        if r is not None:
            print(f"{name:<20} cpu {r['cpu_ms']:6.2f} ms/request   ctxt switches {r['switches']:5.1f}/request"
                  f"   VmRSS {r['rss_mb']:5.1f} MB   threads {r['threads']:.0f}")  # fmt: skip
    again = f"--requests {args.requests} --interval {args.interval:g}"
    print(f"\nreproduce: .venv/bin/python bench/grpc_clients.py {again}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
