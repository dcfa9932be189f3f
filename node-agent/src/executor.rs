//! TODO(executor): being written.
