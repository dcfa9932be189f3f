//! TODO(startup): being written.
