"""`python -m edgequant.cli ...`: the `edgequant` command without its console script."""

from edgequant.cli import main

raise SystemExit(main())
