//! Test harness: the local control plane.
