//! TODO(blamed): being written.
