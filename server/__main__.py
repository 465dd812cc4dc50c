"""`python -m server` is the `finalmarket` command."""

from server.wiring.cli import main

raise SystemExit(main())
