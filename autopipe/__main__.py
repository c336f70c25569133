"""``python -m autopipe ...``: the ``autopipe`` command line (`autopipe._cli`)."""

from autopipe._cli import main

raise SystemExit(main())
