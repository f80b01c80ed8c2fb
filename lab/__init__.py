"""The nodemedic lab: real systemd nodes booted with systemd-nspawn (see lab/README.md)."""
