"""Orders after the purchase path: the record, and (next) the writer, store and sweeper."""
