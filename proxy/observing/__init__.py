"""The observing side: everything done with answered calls after the client has its answer (shadows, drift, ground
truth, capture, redaction, the Envoy ext_proc observer). Lossy by design; nothing here may slow a client call."""
