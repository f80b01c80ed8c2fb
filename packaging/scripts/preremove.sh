#!/bin/sh
# nodemedic: before removal. deb: `prerm remove` (stop; the enablement stays until purge, so a
# reinstall comes back enabled), `prerm upgrade` (nothing: postinst restarts); rpm: %preun with
# $1 = 0 (erase: stop and disable) or 1 (upgrade: nothing).
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
exit 0
