//! hvo-harness, the host side: starts QEMU for an image profile, drives it over
//! QMP and the guest console, reads guest memory, and runs scenarios.

pub mod addr;
pub mod bench;
pub mod console;
pub mod fault;
pub mod fuzz;
pub mod hotplug;
pub mod image;
pub mod invariant;
pub mod kernel;
pub mod machine;
pub mod memory;
pub mod pgtable;
pub mod qemu;
pub mod qmp;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod synth;
pub mod updates;
pub mod verify;
