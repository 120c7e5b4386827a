"""Rules, identity and leaves: errors, hashing, limits, names, durable writes, pools, units."""
