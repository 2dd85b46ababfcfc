"""Everything that adapts grpclib; the only place that touches its private names."""
