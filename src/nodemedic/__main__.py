from nodemedic.cli import main

raise SystemExit(main())
