"""What users read from a run folder: the report (terminal, JSON, HTML)."""
