"""`python -m server` is the `finalmarket` command."""

from server.cli import main

raise SystemExit(main())
