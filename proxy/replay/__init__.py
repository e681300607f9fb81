"""Replaying captured traffic against a candidate model and gating its release (``mlmirror replay``).

The flow, one module per step: read the capture (``captured``) → send each call to the candidate (``sender``) →
score each answer against production's captured one (``scoring``), the candidate's predictions against
production's (``prediction_drift``) and both against reported outcomes (``quality``) → judge by the gate file
(``gate``, ``criteria``) → write the reports (``reports``). ``run`` ties them together and gives the exit code.
"""
