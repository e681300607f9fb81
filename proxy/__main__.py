"""``python -m mlmirror`` runs the ``mlmirror`` command line."""

from mlmirror.cli.main import main

raise SystemExit(main())
