//! Test harness: the local control plane.
pub mod cluster;
pub mod cri_server;
pub mod fakesysfs;
pub mod fleet;
pub use uevent_inject as inject;
pub mod bench;
pub mod demo;
pub mod dra_fixture;
pub mod netns;
pub mod podresources_server;
pub mod recorder;
pub mod scenario_ops;
pub mod wait;
pub mod wedge_view;
