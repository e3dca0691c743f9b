"""twistd dropin: ``twistd -n opencoderouter``; imports nothing heavy."""
from twisted.application.service import ServiceMaker

OpenCodeRouter = ServiceMaker(
    "OpenCodeRouter", "opencoderouter.tap", "Discover, route to and advertise OpenCode servers.", "opencoderouter"
)
