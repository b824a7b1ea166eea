"""The REM-S: appraises A-VM evidence and C-VM reports, issues EAR verdicts."""
