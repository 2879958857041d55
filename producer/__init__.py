"""The producer: a pure, seeded generator of labelled transactions (generator) and the loop that sends them (loop)."""
