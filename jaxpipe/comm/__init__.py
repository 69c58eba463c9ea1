"""Who talks to whom and how: topology, link emulation, point-to-point transports, collectives."""
