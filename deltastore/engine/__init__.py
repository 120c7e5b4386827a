"""What the store does: commits, chains, history, fsck and gc."""
