"""The device: sources, capture, the frame loop, spool, broker sink, commands, service."""
