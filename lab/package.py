"""nodemedic's own .deb in a lab node: built by packaging/build.py (cached under build/packages),
installed with dpkg in place of what the lab image provides for the other tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from lab.node import Node

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "packaging" / "build.py"


def build_packages(*args: str) -> dict[str, str]:
    """Run packaging/build.py; its JSON answer (paths of "deb" and "rpm", "version", ...)."""
    command = [sys.executable, str(BUILD_SCRIPT), *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"packaging/build.py failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, str] = json.loads(done.stdout)
    return result


def bare_node(node: Node) -> None:
    """Take away what the lab image installs for the other tests (launcher, venv, the unit linked
    to the checkout, the bound src/ and units/), so the package alone provides nodemedic."""
    node.sh(
        "umount /opt/nodemedic/src /opt/nodemedic/units && rm -rf /opt/nodemedic "
        "&& rm -f /usr/bin/nodemedic /etc/systemd/system/nodemedic.service && rmdir /etc/nodemedic "
        "&& systemctl daemon-reload"
    )


def install_deb(node: Node, deb: str) -> None:
    """Make the node bare, copy the .deb in and `dpkg -i` it: its postinst enables and starts
    nodemedic.service (Type=notify: active once nodemedic said READY=1)."""
    bare_node(node)
    target = f"/root/{Path(deb).name}"
    shutil.copyfile(deb, node.root / target.lstrip("/"))
    node.run("dpkg", "-i", target, timeout=180)
