//! TODO(sysfs): being written.
