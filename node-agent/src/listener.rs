//! TODO(listener): being written.
