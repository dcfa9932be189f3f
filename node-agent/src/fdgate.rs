//! TODO(fdgate): being written.
