#!/bin/sh
# nodemedic: before removal. deb: `prerm remove` (stop; the enablement stays until purge, so a
# reinstall comes back enabled), `prerm upgrade` (nothing: postinst restarts); rpm: %preun with
# $1 = 0 (erase: stop and disable) or 1 (upgrade: nothing). A removal also restores containerd's
# stock SIGHUP behaviour after the stop (whose ExecStopPost thawed what nodemedic froze):
# `nodemedic sighup-restore` removes nodemedic's drop-ins and reloads systemd; an upgrade keeps them.
set -e
unit=nodemedic.service
case "$1" in
    remove) disable=no ;;
    0) disable=yes ;;
    *) exit 0 ;;
esac
if [ -d /run/systemd/system ]; then
    systemctl stop "$unit" || true
fi
if [ "$disable" = yes ]; then
    systemctl disable "$unit" 2>/dev/null || true
fi
if [ -d /run/systemd/system ] && [ -x /usr/bin/nodemedic ]; then
    /usr/bin/nodemedic sighup-restore --policy /etc/nodemedic/policy.toml ||
        echo "nodemedic: sighup-restore failed; remove /run/systemd/system/containerd.service.d/50-nodemedic-sighup.conf" \
             "and /etc/systemd/system/containerd.service.d/50-nodemedic-sighup.conf by hand, then systemctl daemon-reload" >&2
fi
exit 0
