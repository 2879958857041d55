"""The alternatives ours is measured against: small standalone scripts, each the way its own
docs or examples write it, importing nothing from the product (only the record generator, for
the producer peer, so that every producer sends the same records)."""
