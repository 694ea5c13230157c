"""The growclip-stream service: CLI, HTTP API, metrics and lifecycle around the library.

Named ``growclip_daemon`` (not ``daemon``) so it cannot collide with PyPI's ``python-daemon``.
"""
