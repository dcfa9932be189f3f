//! Test harness: the local control plane.
pub mod cluster;
pub mod fakesysfs;
pub mod fleet;
pub use uevent_inject as inject;
pub mod netns;
pub mod podresources_server;
pub mod recorder;
pub mod demo;
pub mod bench;
