#!/bin/sh
# nodemedic: after removal. deb: `postrm remove` and `postrm purge`; rpm: %postun with $1 = 0
# (erase) or 1 (upgrade). Only a purge removes the state in /var/lib/nodemedic, and never a
# quarantine that holds something: that is data moved aside from containerd's socket paths.
set -e
unit=nodemedic.service
state=/var/lib/nodemedic
case "$1" in
    remove | 0) ;;
    purge)
        rm -f "/etc/systemd/system/multi-user.target.wants/$unit"
        rm -f /etc/nodemedic/policy.toml.dpkg-old /etc/nodemedic/policy.toml.dpkg-dist \
              /etc/nodemedic/policy.toml.dpkg-new /etc/nodemedic/policy.toml.ucf-dist
        rmdir /etc/nodemedic 2>/dev/null || true
        if [ -d "$state" ]; then
            if [ -n "$(ls -A "$state/quarantine" 2>/dev/null)" ]; then
                find "$state" -mindepth 1 -maxdepth 1 ! -name quarantine -exec rm -rf {} +
                echo "nodemedic: kept $state/quarantine: it holds what was moved aside from" \
                     "containerd's socket paths; remove it by hand once checked" >&2
            else
                rm -rf "$state"
            fi
        fi
        ;;
    *) exit 0 ;;
esac
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
if command -v journalctl >/dev/null 2>&1; then
    journalctl --update-catalog || true
fi
exit 0
