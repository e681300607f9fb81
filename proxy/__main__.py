"""``python -m proxy`` runs the ``mlmirror`` command line."""

from .cli import main

raise SystemExit(main())
