//! TODO(host): being written.
