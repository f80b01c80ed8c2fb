#!/bin/sh
# nodemedic: after install or upgrade. deb: `postinst configure [OLD-VERSION]`; rpm: %post with
# $1 = 1 (install) or 2 (upgrade). A first install enables and starts the unit (Debian's convention
# for services, used for the rpm too); an upgrade restarts it if it is enabled, and otherwise
# leaves an operator's `systemctl disable` alone. A failed start does not fail the install.
set -e
unit=nodemedic.service
case "$1" in
    configure) if [ -z "${2:-}" ]; then first=yes; else first=no; fi ;;
    1) first=yes ;;
    [2-9]*) first=no ;;
    *) exit 0 ;;
esac

if command -v journalctl >/dev/null 2>&1; then
    journalctl --update-catalog || echo "nodemedic: journalctl --update-catalog failed" >&2
fi
# Only where systemd runs (not in a chroot or an image build); `enable` works offline too.
running=no
[ -d /run/systemd/system ] && running=yes
[ "$running" = yes ] && systemctl daemon-reload
# the API's bus policy (/usr/share/dbus-1/system.d/io.nodemedic1.conf): dbus-daemon reads new files
# by itself, dbus-broker only when reloaded; nodemedic retries owning its name meanwhile
[ "$running" = yes ] && { systemctl reload dbus.service 2>/dev/null || true; }
if [ "$first" = yes ]; then
    systemctl enable "$unit" 2>/dev/null || echo "nodemedic: could not enable $unit" >&2
    action=start
elif systemctl is-enabled --quiet "$unit" 2>/dev/null; then
    action=restart
else
    action=
fi
if [ "$running" = yes ] && [ -n "$action" ]; then
    systemctl "$action" "$unit" || echo "nodemedic: $unit did not $action; see: journalctl -u $unit" >&2
fi
exit 0
