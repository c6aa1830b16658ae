"""medagent: push messages from the cloud to devices in hospitals and labs."""

__version__ = "0.1.0"
