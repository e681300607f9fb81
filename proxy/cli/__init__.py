"""The ``mlmirror`` command line and the tables it prints from a running proxy's ``/status``."""
