//! The unwedge node agent: hears `WEDGED=` uevents, resolves the device and who uses it,
//! reports a GpuWedge for its own node, and carries out the recoveries the operator approves.

pub mod blamed;
pub mod config;
pub mod cri;
pub mod detections;
pub mod dra;
pub mod executor;
pub mod fdgate;
pub mod guard;
pub mod host;
pub mod jsonl;
pub mod listener;
pub mod metrics;
pub mod node_events;
pub mod outbox;
pub mod podresources;
pub mod reporter;
pub mod restart;
pub mod run;
pub mod startup;
pub mod sysfs;
pub mod uevent;
pub mod verify_command;
