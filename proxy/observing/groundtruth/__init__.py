"""Ground truth: predictions kept until their outcome is reported, the Feedback service, and quality per window."""
