"""mqtt-agent: a device agent for Linux IoT gateways."""

__version__ = "0.1.0"
