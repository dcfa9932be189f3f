//! The unwedge operator.
