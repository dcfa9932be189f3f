//! TODO(outbox): being written.
