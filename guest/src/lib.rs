//! The firmware's memory code that does not depend on the machine it runs on:
//! address types, ranges, the frame allocator, the page-table mapper with
//! every architecture's entry format, and sparse sections. The firmware binary
//! (main.rs) links it; `cargo test --lib` runs its tests on the host, where
//! physical memory is a pool in a Vec (see `mm::FrameAccess`).
#![cfg_attr(not(test), no_std)]

pub mod formats;
pub mod mm;
pub mod sparse;
