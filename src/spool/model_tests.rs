//! Property test: the spool against a VecDeque model across simulated restarts.
