"""Relying parties: gates that ask the REM-S before letting a C-VM through."""
