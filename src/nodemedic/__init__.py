"""nodemedic: a self-healing watchdog for containerd on Kubernetes GPU nodes."""

__version__ = "0.1.0"
