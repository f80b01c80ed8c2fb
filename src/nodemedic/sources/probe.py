"""A real request to containerd: its Version API over the socket, with grpcio.

The request and response messages are google.protobuf.Empty and
containerd.services.version.v1.VersionResponse {string version = 1; string revision = 2;}; the
latter is built from its descriptor here, so no generated code is checked in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import cache
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, empty_pb2, message_factory

from nodemedic.errors import ProbeError
from nodemedic.events import Event, ProbeAnswered, ProbeFailed
from nodemedic.ports import Clock, VersionProbe

VERSION_METHOD = "/containerd.services.version.v1.Version/Version"


@cache
def _version_response() -> type[Any]:
    proto = descriptor_pb2.FileDescriptorProto(
        name="nodemedic/containerd_version.proto",
        package="containerd.services.version.v1",
        syntax="proto3",
    )
    msg = proto.message_type.add(name="VersionResponse")
    for number, name in ((1, "version"), (2, "revision")):
        msg.field.add(
            name=name,
            number=number,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("containerd.services.version.v1.VersionResponse")
    )


class ContainerdProbe:
    """Asks containerd for its version; a new channel per request, so no reconnect backoff delays
    seeing a containerd that has just come back."""

    async def version(self, socket: str, timeout: float) -> str:
        response_type = _version_response()
        try:
            async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
                call = channel.unary_unary(
                    VERSION_METHOD,
                    request_serializer=empty_pb2.Empty.SerializeToString,
                    response_deserializer=response_type.FromString,
                )
                response = await call(empty_pb2.Empty(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise ProbeError(f"containerd Version on {socket}: {exc.code().name}: {exc.details()}") from exc
        return str(response.version)


class ProbeLoop:
    """Asks containerd for its version every ``interval``; each failure is reported with the number
    of failures in a row, so a rule can wait for N. A probe is periodic by nature: a hung containerd
    sends no event (systemd still says active/running), only a real request shows it."""

    def __init__(
        self,
        probe: VersionProbe,
        socket: str,
        interval: float,
        timeout: float,
        emit: Callable[[Event], None],
        clock: Clock,
    ) -> None:
        self._probe = probe
        self.socket = socket
        self.interval = interval
        self.timeout = timeout
        self._emit = emit
        self._clock = clock

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                await self._probe.version(self.socket, self.timeout)
            except ProbeError as exc:
                failures += 1
                self._emit(ProbeFailed(self.socket, str(exc), failures, at=self._clock.monotonic()))
            else:
                if failures:
                    self._emit(ProbeAnswered(self.socket, at=self._clock.monotonic()))
                failures = 0
            await asyncio.sleep(self.interval)
