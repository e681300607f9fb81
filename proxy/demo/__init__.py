"""The bundled demo: numpy models served over KServe V2, traffic, and the ``mlmirror demo`` story."""
