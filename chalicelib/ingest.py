"""Placeholder until the ingest issue lands: the route's entry point."""
BINARY_REQUEST_TYPES = ["application/json", "text/plain"]


def handle(request, context, settings):
    raise NotImplementedError("ingest is being written")
