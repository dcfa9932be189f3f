//! TODO(config): being written.
