"""The A-VM agent: introspects its C-VMs and reports to the REM-S over the control channel."""
