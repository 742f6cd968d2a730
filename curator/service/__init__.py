"""`curator serve`: the library over HTTP (docs/service.md).

The server owns its workspace while it runs; long work runs as jobs in a worker process, one at a
time; reads and searches are answered in the server process from short catalog connections.
"""
