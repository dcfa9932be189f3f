//! TODO(podresources): being written.
