"""The CPU side of bertstream: worker processes that turn a corpus index into a stream of masked batches."""
