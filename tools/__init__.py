"""Workstation tools: local runner, deploy and provisioning, simulators, benchmark."""
