//! Test harness: the local control plane.
pub mod fakesysfs;
pub mod netns;
pub mod recorder;
pub mod inject;
pub mod cluster;
