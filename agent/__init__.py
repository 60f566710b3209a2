"""mqtt-agent: a device agent for Linux IoT gateways."""

__version__ = "0.1.0"


def paho_version() -> str:
    """paho-mqtt's version, from its own attribute (importlib.metadata would cost an import for one string).

    The one place outside agent/connection/ that touches paho, and only to read this string.
    """
    from paho.mqtt import __version__ as version

    return str(version)
