"""containerd's real CRI plugin driven the way the kubelet drives it, over the CRI v1 runtime API.

There is no Kubernetes in the lab (and Debian 12 has no crictl): this module is the client. It
talks gRPC to the node's containerd socket from the host, through the node's root
(``/proc/<leader>/root/run/containerd/containerd.sock``), with the CRI v1 messages built from
descriptors (no generated code, no protoc): see `_CRI_FIELDS` for the trimmed copy of
k8s.io/cri-api's api.proto it is made from.

    prepare_cri(node)                               # images built locally and imported, CRI ready
    pod = run_hostpath_pod(node, "p1")              # a busybox pod with hostPath of the socket path
    remove_pod(node, pod)

No registry is reachable: the sandbox ("pause") image and the container image are built here from
the node's static busybox (Debian's busybox-static, /bin/busybox), as OCI image tarballs made by
hand, tagged as the CRI plugin's ``sandbox_image`` (so nothing is pulled) and imported into the
``k8s.io`` namespace with ``ctr images import``. Pods use the node's network namespace
(NamespaceOption network=NODE), so no CNI is needed. The node needs ``Node.boot(containers=True)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from lab.node import Node

SOCKET = "/run/containerd/containerd.sock"
BUSYBOX_IMAGE = "lab.local/busybox:static"
"""The container image: Debian's static busybox alone, built in the node (no registry)."""
POD_NAMESPACE = "lab-cri"
IMAGE_DIR = "/run/nodemedic-lab/cri-images"  # inside the node: the tarballs made by hand
RUNTIME = "/runtime.v1.RuntimeService/"
CRI_READY_TIMEOUT = 30.0
CALL_TIMEOUT = 30.0


class CriError(RuntimeError):
    """containerd's CRI plugin refused a request (the message is containerd's own error) or is not
    ready; prepare the node with `prepare_cri` and boot it with ``containers=True``."""


@dataclass(frozen=True)
class CriPod:
    """A pod sandbox and its one container, as the CRI plugin named them."""

    sandbox_id: str
    container_id: str
    name: str = ""


# ---- the CRI v1 messages ------------------------------------------------------------------------
#
# A trimmed copy of k8s.io/cri-api pkg/apis/runtime/v1/api.proto (v0.25.0, the version containerd
# 1.6.20 vendors), keeping only the messages and fields used here, with upstream's field numbers:
#
#   Copyright 2020 The Kubernetes Authors.
#   Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file
#   except in compliance with the License. You may obtain a copy of the License at
#       http://www.apache.org/licenses/LICENSE-2.0
#   Unless required by applicable law or agreed to in writing, software distributed under the
#   License is distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND,
#   either express or implied. See the License for the specific language governing permissions
#   and limitations under the License.
#
# (number, name, type): type is a scalar ("string", "bool", "uint32", "int32", "int64"), a message
# or an enum of this package; a leading "*" means repeated.
_CRI_ENUMS: dict[str, tuple[str, ...]] = {
    "NamespaceMode": ("POD", "CONTAINER", "NODE", "TARGET"),
    "MountPropagation": ("PROPAGATION_PRIVATE", "PROPAGATION_HOST_TO_CONTAINER", "PROPAGATION_BIDIRECTIONAL"),
    "ContainerState": ("CONTAINER_CREATED", "CONTAINER_RUNNING", "CONTAINER_EXITED", "CONTAINER_UNKNOWN"),
}
_CRI_FIELDS: dict[str, tuple[tuple[int, str, str], ...]] = {
    "VersionRequest": ((1, "version", "string"),),
    "VersionResponse": ((1, "version", "string"), (2, "runtime_name", "string"),
                        (3, "runtime_version", "string"), (4, "runtime_api_version", "string")),
    "NamespaceOption": ((1, "network", "NamespaceMode"), (2, "pid", "NamespaceMode"),
                        (3, "ipc", "NamespaceMode")),
    "LinuxSandboxSecurityContext": ((1, "namespace_options", "NamespaceOption"),),
    "LinuxPodSandboxConfig": ((1, "cgroup_parent", "string"),
                              (2, "security_context", "LinuxSandboxSecurityContext")),
    "PodSandboxMetadata": ((1, "name", "string"), (2, "uid", "string"), (3, "namespace", "string"),
                           (4, "attempt", "uint32")),
    "PodSandboxConfig": ((1, "metadata", "PodSandboxMetadata"), (2, "hostname", "string"),
                         (3, "log_directory", "string"), (8, "linux", "LinuxPodSandboxConfig")),
    "RunPodSandboxRequest": ((1, "config", "PodSandboxConfig"), (2, "runtime_handler", "string")),
    "RunPodSandboxResponse": ((1, "pod_sandbox_id", "string"),),
    "StopPodSandboxRequest": ((1, "pod_sandbox_id", "string"),),
    "StopPodSandboxResponse": (),
    "RemovePodSandboxRequest": ((1, "pod_sandbox_id", "string"),),
    "RemovePodSandboxResponse": (),
    "ImageSpec": ((1, "image", "string"),),
    "Mount": ((1, "container_path", "string"), (2, "host_path", "string"), (3, "readonly", "bool"),
              (4, "selinux_relabel", "bool"), (5, "propagation", "MountPropagation")),
    "ContainerMetadata": ((1, "name", "string"), (2, "attempt", "uint32")),
    "LinuxContainerSecurityContext": ((3, "namespace_options", "NamespaceOption"),),
    "LinuxContainerConfig": ((2, "security_context", "LinuxContainerSecurityContext"),),
    "ContainerConfig": ((1, "metadata", "ContainerMetadata"), (2, "image", "ImageSpec"),
                        (3, "command", "*string"), (4, "args", "*string"), (7, "mounts", "*Mount"),
                        (11, "log_path", "string"), (15, "linux", "LinuxContainerConfig")),
    "CreateContainerRequest": ((1, "pod_sandbox_id", "string"), (2, "config", "ContainerConfig"),
                               (3, "sandbox_config", "PodSandboxConfig")),
    "CreateContainerResponse": ((1, "container_id", "string"),),
    "StartContainerRequest": ((1, "container_id", "string"),),
    "StartContainerResponse": (),
    "StopContainerRequest": ((1, "container_id", "string"), (2, "timeout", "int64")),
    "StopContainerResponse": (),
    "RemoveContainerRequest": ((1, "container_id", "string"),),
    "RemoveContainerResponse": (),
    "ContainerStatusRequest": ((1, "container_id", "string"), (2, "verbose", "bool")),
    "ContainerStatus": ((1, "id", "string"), (3, "state", "ContainerState"), (7, "exit_code", "int32"),
                        (10, "reason", "string"), (11, "message", "string"), (14, "mounts", "*Mount")),
    "ContainerStatusResponse": ((1, "status", "ContainerStatus"),),
    "StatusRequest": ((1, "verbose", "bool"),),
    "RuntimeCondition": ((1, "type", "string"), (2, "status", "bool"), (3, "reason", "string"),
                         (4, "message", "string")),
    "RuntimeStatus": ((1, "conditions", "*RuntimeCondition"),),
    "StatusResponse": ((1, "status", "RuntimeStatus"),),
}  # fmt: skip
_SCALARS = {
    "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
    "bool": descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
    "uint32": descriptor_pb2.FieldDescriptorProto.TYPE_UINT32,
    "int32": descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
    "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
}


def _field(msg: descriptor_pb2.DescriptorProto, number: int, name: str, kind: str) -> None:
    fdp = descriptor_pb2.FieldDescriptorProto
    repeated = kind.startswith("*")
    kind = kind.lstrip("*")
    label = fdp.LABEL_REPEATED if repeated else fdp.LABEL_OPTIONAL
    field = msg.field.add(name=name, number=number, label=label)
    if kind in _SCALARS:
        field.type = _SCALARS[kind]
    else:
        field.type = fdp.TYPE_ENUM if kind in _CRI_ENUMS else fdp.TYPE_MESSAGE
        field.type_name = f".runtime.v1.{kind}"


@cache
def cri() -> dict[str, Any]:
    """The CRI v1 message classes by name (``cri()["Mount"](host_path=...)``) and enum values."""
    proto = descriptor_pb2.FileDescriptorProto(name="lab/cri.proto", package="runtime.v1", syntax="proto3")
    for name, values in _CRI_ENUMS.items():
        enum = proto.enum_type.add(name=name)
        for number, value in enumerate(values):
            enum.value.add(name=value, number=number)
    for name, fields in _CRI_FIELDS.items():
        msg = proto.message_type.add(name=name)
        for number, field_name, kind in fields:
            _field(msg, number, field_name, kind)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    classes: dict[str, Any] = {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"runtime.v1.{name}"))
        for name in _CRI_FIELDS
    }
    for values in _CRI_ENUMS.values():
        classes.update({value: number for number, value in enumerate(values)})
    return classes


# ---- the client --------------------------------------------------------------------------------


class CriClient:
    """One gRPC channel to the node's containerd socket, kept open: requests on it still reach
    containerd after its socket file is unlinked (a connection that outlived the unlink)."""

    def __init__(self, node: Node, socket: str = SOCKET) -> None:
        self.target = f"unix://{node.root}{socket}"
        self.channel = grpc.insecure_channel(self.target)

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def connect(self, timeout: float = 10.0) -> None:
        """Open the connection now (gRPC connects lazily)."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise CriError(f"no connection to containerd at {self.target} within {timeout:g}s") from None

    def call(self, method: str, request: Any, timeout: float = CALL_TIMEOUT) -> Any:
        """One RuntimeService call; containerd's error becomes a CriError with its message."""
        name = type(request).DESCRIPTOR.name
        response_type = cri()[name.removesuffix("Request") + "Response"]
        stub = self.channel.unary_unary(RUNTIME + method, request_serializer=type(request).SerializeToString,
                                        response_deserializer=response_type.FromString)  # fmt: skip
        try:
            return stub(request, timeout=timeout)
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            detail = err.details() if isinstance(err, grpc.Call) else str(err)
            raise CriError(f"CRI {method} failed ({code}): {detail}") from None


@contextlib.contextmanager
def _client(node: Node, client: CriClient | None) -> Iterator[CriClient]:
    if client is not None:
        yield client
        return
    with CriClient(node) as own:
        yield own


def runtime_ready(node: Node, client: CriClient | None = None) -> bool:
    """The CRI plugin answers Status with RuntimeReady true (NetworkReady is not needed: pods use
    the node's network namespace)."""
    m = cri()
    with _client(node, client) as c:
        try:
            status = c.call("Status", m["StatusRequest"](), timeout=5)
        except CriError:
            return False
    return any(cond.type == "RuntimeReady" and cond.status for cond in status.status.conditions)


# ---- images: OCI image tarballs made by hand from the node's static busybox ---------------------


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes | None = None, *, link: str = "",
                mode: int = 0o755) -> None:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.mode, info.mtime, info.uname, info.gname = mode, 0, "root", "root"
    if link:
        info.type, info.linkname = tarfile.SYMTYPE, link
    elif data is None:
        info.type = tarfile.DIRTYPE
    else:
        info.size = len(data)
    tar.addfile(info, None if data is None else io.BytesIO(data))


def _busybox_layer(busybox: bytes) -> bytes:
    """An uncompressed layer: /bin/busybox, /bin/sh and /bin/sleep linked to it, empty /etc, /tmp."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for folder in ("bin", "etc", "tmp"):
            _tar_member(tar, folder + "/", mode=0o1777 if folder == "tmp" else 0o755)
        _tar_member(tar, "bin/busybox", busybox)
        for applet in ("sh", "sleep"):
            _tar_member(tar, f"bin/{applet}", link="busybox")
    return out.getvalue()


def oci_image_tarball(ref: str, busybox: bytes, entrypoint: list[str]) -> bytes:
    """An OCI image layout (oci-layout, index.json, blobs/sha256/...) as a tar, one amd64 image of
    one layer, named ``ref`` by the annotations `ctr images import` reads."""
    layer = _busybox_layer(busybox)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }).encode()  # fmt: skip
    blobs: dict[str, bytes] = {}

    def descriptor(media_type: str, data: bytes) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}

    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", layer)],
    }).encode()  # fmt: skip
    entry = descriptor("application/vnd.oci.image.manifest.v1+json", manifest)
    entry["annotations"] = {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": ref}
    entry["platform"] = {"architecture": "amd64", "os": "linux"}
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [entry]}).encode()  # fmt: skip
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _tar_member(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}', mode=0o644)
        _tar_member(tar, "index.json", index, mode=0o644)
        for digest, data in blobs.items():
            _tar_member(tar, f"blobs/sha256/{digest}", data, mode=0o644)
    return out.getvalue()


def sandbox_image(node: Node) -> str:
    """The CRI plugin's configured sandbox image (``sandbox_image`` in `containerd config dump`)."""
    for line in node.run("containerd", "config", "dump").stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "sandbox_image":
            return value.strip().strip('"')
    raise CriError("containerd config dump names no sandbox_image: is the CRI plugin configured?")


def _import_image(node: Node, ref: str, entrypoint: list[str]) -> None:
    listed = node.run("ctr", "-n", "k8s.io", "images", "ls", "-q").stdout.split()
    if ref in listed:
        return
    busybox = (node.root / "bin/busybox").read_bytes()
    tarball = f"{IMAGE_DIR}/{ref.replace('/', '_').replace(':', '_')}.tar"
    host_path = Path(f"{node.root}{tarball}")
    host_path.parent.mkdir(parents=True, exist_ok=True)
    host_path.write_bytes(oci_image_tarball(ref, busybox, entrypoint))
    node.run("ctr", "-n", "k8s.io", "images", "import", tarball, timeout=60)


CRI_TABLE = '[plugins."io.containerd.grpc.v1.cri"]'


LAB_CRI_SETTINGS = ("disable_cgroup = true", "restrict_oom_score_adj = true")


def _configure_cri_for_the_lab(node: Node) -> None:
    """`LAB_CRI_SETTINGS` in the CRI plugin's table of config.toml, then containerd restarted (once).

    Lab only, because a node is a container itself (nspawn), and neither setting touches mounts:
    - disable_cgroup: the node's cgroup2 has no cpu controller (the host binds it to v1), and the
      CRI plugin gives every sandbox ``cpu.shares = 2`` (``WithDefaultSandboxShares``, skipped only
      with disable_cgroup): "openat2 .../cpu.weight: no such file or directory";
    - restrict_oom_score_adj: nspawn drops CAP_SYS_RESOURCE, so runc cannot set the sandbox's
      oom_score_adj of -998: "runc create failed: unable to start container process: can't get
      final child's PID from pipe: EOF"; restricted, it is not set below containerd's own."""
    dump = node.run("containerd", "config", "dump").stdout
    if all(setting in dump for setting in LAB_CRI_SETTINGS):
        return
    config = node.run("cat", "/etc/containerd/config.toml").stdout
    if CRI_TABLE not in config:
        raise CriError(f"/etc/containerd/config.toml has no {CRI_TABLE} table to set disable_cgroup in")
    node.write_file("/etc/containerd/config.toml",
                    config.replace(CRI_TABLE, "\n    ".join((CRI_TABLE, *LAB_CRI_SETTINGS)), 1))  # fmt: skip
    node.run("systemctl", "restart", "containerd.service", timeout=60)
    deadline = time.monotonic() + CRI_READY_TIMEOUT
    while node.run("ctr", "--connect-timeout", "1s", "version", check=False, timeout=10).returncode != 0:
        if time.monotonic() > deadline:
            raise CriError(f"containerd did not come back after setting {LAB_CRI_SETTINGS}")
        time.sleep(0.05)


def prepare_cri(node: Node) -> None:
    """Make the node's CRI plugin ready to run pods without a registry; idempotent.

    Sets `LAB_CRI_SETTINGS` (a lab-only config change, see `_configure_cri_for_the_lab`;
    containerd is restarted once for it), checks that
    ``io.containerd.grpc.v1.cri`` is loaded (`ctr plugins ls`: Debian's containerd 1.6.20 loads it
    with its shipped config.toml), creates /etc/hosts if missing, builds and imports the sandbox
    image (tagged as ``sandbox_image``, its entrypoint a busybox ``sleep``) and `BUSYBOX_IMAGE`, and
    waits until the CRI plugin says RuntimeReady."""
    _configure_cri_for_the_lab(node)
    plugins = node.run("ctr", "plugins", "ls").stdout.splitlines()
    if not any(line.split()[:2] == ["io.containerd.grpc.v1", "cri"] and line.split()[-1] == "ok"
               for line in plugins if line.split()):  # fmt: skip
        raise CriError("containerd's CRI plugin is not loaded (ctr plugins ls): check disabled_plugins")
    # A host-network sandbox gets copies of the node's /etc/hosts and /etc/resolv.conf; the
    # minbase image has no /etc/hosts ("failed to setup sandbox files: ... open /etc/hosts").
    node.sh("test -e /etc/hosts || printf '127.0.0.1 localhost\\n::1 localhost\\n' > /etc/hosts; "
            "test -e /etc/resolv.conf || : > /etc/resolv.conf")  # fmt: skip
    _import_image(node, sandbox_image(node), ["/bin/busybox", "sleep", "2147483647"])
    _import_image(node, BUSYBOX_IMAGE, ["/bin/busybox", "sleep", "2147483647"])
    deadline = time.monotonic() + CRI_READY_TIMEOUT
    while not runtime_ready(node):
        if time.monotonic() > deadline:
            raise CriError(f"the CRI plugin did not say RuntimeReady within {CRI_READY_TIMEOUT:g}s")
        time.sleep(0.1)


# ---- pods ---------------------------------------------------------------------------------------


def _sandbox_config(name: str) -> Any:
    m = cri()
    node_ns = m["NamespaceOption"](network=m["NODE"], pid=m["POD"], ipc=m["POD"])
    uid = hashlib.sha256(name.encode()).hexdigest()[:32]
    return m["PodSandboxConfig"](
        metadata=m["PodSandboxMetadata"](name=name, uid=uid, namespace=POD_NAMESPACE, attempt=0),
        # No hostname: the kubelet sends none for a host-network pod (runc refuses one without a
        # private UTS namespace: "unable to set hostname without a private UTS namespace").
        log_directory=f"/var/log/pods/{POD_NAMESPACE}_{name}_{uid}",
        linux=m["LinuxPodSandboxConfig"](security_context=m["LinuxSandboxSecurityContext"](namespace_options=node_ns)),
    )  # fmt: skip


def _container_config(name: str, host_path: str) -> Any:
    """What the kubelet sends for a container with a hostPath volume (type unset) mounted at the
    same path: a bind mount, read-write, no SELinux relabel, private propagation."""
    m = cri()
    mount = m["Mount"](container_path=host_path, host_path=host_path, readonly=False, selinux_relabel=False,
                       propagation=m["PROPAGATION_PRIVATE"])  # fmt: skip
    node_ns = m["NamespaceOption"](network=m["NODE"], pid=m["CONTAINER"], ipc=m["POD"])
    security = m["LinuxContainerSecurityContext"](namespace_options=node_ns)
    return m["ContainerConfig"](
        metadata=m["ContainerMetadata"](name=name, attempt=0),
        image=m["ImageSpec"](image=BUSYBOX_IMAGE),
        command=["/bin/busybox", "sleep", "3600"],
        mounts=[mount],
        log_path=f"{name}/0.log",
        linux=m["LinuxContainerConfig"](security_context=security),
    )


def run_hostpath_pod(
    node: Node, name: str, host_path: str = SOCKET, client: CriClient | None = None
) -> CriPod:
    """RunPodSandbox (node network namespace), then CreateContainer + StartContainer of a busybox
    ``sleep`` with a hostPath mount of ``host_path``, as the kubelet does. CreateContainer is where
    the CRI plugin's ``WithMounts`` creates a missing host path as a directory. With ``client``
    the requests go over that (already open) connection. Raises CriError with containerd's error."""
    m = cri()
    sandbox = _sandbox_config(name)
    with _client(node, client) as c:
        sandbox_id = c.call("RunPodSandbox", m["RunPodSandboxRequest"](config=sandbox)).pod_sandbox_id
        try:
            config = _container_config(name, host_path)
            request = m["CreateContainerRequest"](
                pod_sandbox_id=sandbox_id, config=config, sandbox_config=sandbox
            )
            created = c.call("CreateContainer", request)
            c.call("StartContainer", m["StartContainerRequest"](container_id=created.container_id))
        except CriError:
            with contextlib.suppress(CriError):
                _remove_sandbox(c, sandbox_id)
            raise
    return CriPod(sandbox_id, created.container_id, name)


def container_state(node: Node, pod: CriPod, client: CriClient | None = None) -> str:
    """The container's CRI state name (CONTAINER_RUNNING, ...)."""
    m = cri()
    with _client(node, client) as c:
        status = c.call("ContainerStatus", m["ContainerStatusRequest"](container_id=pod.container_id)).status
    return str(_CRI_ENUMS["ContainerState"][status.state])


def _remove_sandbox(c: CriClient, sandbox_id: str) -> None:
    m = cri()
    c.call("StopPodSandbox", m["StopPodSandboxRequest"](pod_sandbox_id=sandbox_id))
    c.call("RemovePodSandbox", m["RemovePodSandboxRequest"](pod_sandbox_id=sandbox_id))


def _not_found(err: CriError) -> bool:
    return "NOT_FOUND" in str(err) or "not found" in str(err)


def remove_pod(node: Node, pod: CriPod, client: CriClient | None = None) -> None:
    """Stop and remove the container, then the sandbox; one already gone is no error."""
    m = cri()
    with _client(node, client) as c:
        for method, request in (
            ("StopContainer", m["StopContainerRequest"](container_id=pod.container_id, timeout=0)),
            ("RemoveContainer", m["RemoveContainerRequest"](container_id=pod.container_id)),
        ):
            try:
                c.call(method, request)
            except CriError as err:
                if not _not_found(err):
                    raise
        try:
            _remove_sandbox(c, pod.sandbox_id)
        except CriError as err:
            if not _not_found(err):
                raise
