"""What ships to Lambda: the ingest path (parse, pack, send) and the consumer.

Nothing here may import from ``tools/`` (workstation code).
"""
