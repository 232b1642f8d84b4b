"""Federated learning of the item tower: messages, local update, aggregation, server step, loop."""
