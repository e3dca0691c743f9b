"""OpenCodeRouter: discover, route to and advertise the OpenCode servers on one machine."""

__version__ = "0.1.0"
