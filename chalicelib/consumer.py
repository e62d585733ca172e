"""Placeholder until the consumer issue lands."""


def handle(event, context, settings):
    raise NotImplementedError("consumer is being written")
