"""Run by /usr/bin/nodemedic as `python3.X -I -B /opt/nodemedic/lib/entry.py ARGS`.

-I keeps the environment (PYTHONPATH, user site-packages, the current folder) out of sys.path;
this puts the library tree vendored for this Python first, before the distribution's packages.
"""

import sys
from pathlib import Path

LIB = Path(__file__).resolve().parent / f"python{sys.version_info[0]}.{sys.version_info[1]}"
if not LIB.is_dir():
    have = ", ".join(sorted(p.name for p in LIB.parent.glob("python3.*")))
    sys.exit(f"nodemedic: no library tree for Python {sys.version.split()[0]} at {LIB}; it has {have}")
sys.path.insert(0, str(LIB))

from nodemedic.cli import main  # noqa: E402

sys.exit(main())
