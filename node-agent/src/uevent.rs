//! TODO(uevent): being written.
