//! TODO(reporter): being written.
