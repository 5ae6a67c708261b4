"""Development stand-ins: local Cloud Run Jobs server, emulator and Redis starters, the dev stack, API test helpers.

Nothing here runs in production; the runtime packages never import it.
"""
