"""The parts that act on SIGHUP storms: containerd's drop-in (coalesce) and the cgroup freezer (throttle)."""
