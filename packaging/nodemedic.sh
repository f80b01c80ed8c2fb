#!/bin/sh
# /usr/bin/nodemedic, installed by the nodemedic package. Runs nodemedic with a Python that has a
# library tree vendored under /opt/nodemedic/lib: the distribution's python3 if it is one of
# them (Debian 12: 3.11, Ubuntu 22.04: 3.10, 24.04: 3.12), else python3.12, python3.11, python3.10
# (RHEL 9: its python3.11/python3.12 packages). NODEMEDIC_PYTHON=/path/to/python3.X chooses.
# The library is found from this file's real place (/usr/bin/../../opt/nodemedic/lib), so a tree
# unpacked into a scratch root runs as installed.
here=$(dirname "$(readlink -f "$0")")
lib=$(cd "$here/../../opt/nodemedic/lib" 2>/dev/null && pwd -P) || lib=/opt/nodemedic/lib
if [ -n "${NODEMEDIC_PYTHON:-}" ]; then
    candidates=$NODEMEDIC_PYTHON
else
    candidates="$(readlink -f /usr/bin/python3 2>/dev/null) /usr/bin/python3.12 /usr/bin/python3.11 /usr/bin/python3.10"
fi
for py in $candidates; do
    version=${py##*/python}
    if [ -x "$py" ] && [ -d "$lib/python$version" ]; then
        exec "$py" -I -B "$lib/entry.py" "$@"
    fi
done
echo "nodemedic: no supported Python among: $candidates" >&2
echo "nodemedic: install python3.12, python3.11 or python3.10 (this package has: $(cd $lib && echo python3.*))" >&2
exit 127
