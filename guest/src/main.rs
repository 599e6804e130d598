//! hvo-guest: a tiny firmware that boots on x86_64 (q35), arm64 (virt) and
//! ppc64le (pseries, radix), builds kernel-style page tables, publishes a
//! manifest and serves the host's commands on its console.
#![no_std]
#![no_main]

mod arch;
mod commands;
mod console;
mod manifest;
mod paging;
mod vmemmap;

use hvo_guest::mm;
use mm::frames::FrameAllocator;
use mm::{Range, RangeList};
use paging::{Table, Tables};
use vmemmap::Vmemmap;

extern "C" {
    // Defined by every linker script in images/.
    static __image_start: u8;
    static __image_end: u8;
}

fn image_range() -> Range {
    // Only the addresses of the linker symbols are taken.
    let (start, end) = (core::ptr::addr_of!(__image_start) as u64, core::ptr::addr_of!(__image_end) as u64);
    Range { start, end }
}

/// Everything the firmware manages, handed to the command loop.
pub struct Kernel {
    pub frames: FrameAllocator,
    pub tables: Tables,
    /// A second root, as a process has, that must carry the kernel's entries.
    pub process: Table,
    pub vmemmap: Vmemmap,
    pub ram: RangeList,
    pub image: Range,
}

/// Called by the architecture's entry code with its stack and traps set up.
pub fn main(platform: arch::Platform) -> ! {
    // Before the first page-table store, which it records.
    mm::update_log::init();
    let image = image_range();
    let mut reserved = platform.reserved;
    reserved.push(image);
    let mut frames = FrameAllocator::new(&platform.ram, &reserved, arch::BASE_PAGE);
    let tables = match paging::build(&mut frames, &platform) {
        Ok(t) => t,
        Err(e) => panic!("building the boot page tables failed: {e:?}"),
    };
    arch::enable_mmu(&tables);
    // The process root starts as a copy of the kernel's top level; entries
    // the kernel adds later must be copied into it too.
    let mut process = match Table::new(&mut frames) {
        Ok(t) => t,
        Err(e) => panic!("allocating the process root failed: {e:?}"),
    };
    process.copy_top_level(&tables.kernel, mm::VirtAddr(0), mm::VirtAddr(u64::MAX));
    let vmemmap = Vmemmap::new(&platform.ram);
    let mut kernel = Kernel { frames, tables, process, vmemmap, ram: platform.ram, image };
    manifest::publish(&kernel);
    println!("{} ready abi={} arch={}", hvo_abi::protocol::PREFIX, hvo_abi::manifest::ABI_VERSION, arch::ARCH);
    commands::serve(&mut kernel)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    // One line: the host reports the crash line as the verdict's message.
    match info.location() {
        Some(at) => println!("\n{} crash: panic: {} (at {at})", hvo_abi::protocol::PREFIX, info.message()),
        None => println!("\n{} crash: panic: {}", hvo_abi::protocol::PREFIX, info.message()),
    }
    arch::exit(1)
}

/// The failure path of trap handlers: one crash line, the registers, then exit.
pub fn crash(what: core::fmt::Arguments, registers: &dyn Fn(&mut console::Console)) -> ! {
    println!("\n{} crash: {}", hvo_abi::protocol::PREFIX, what);
    registers(&mut console::Console);
    arch::exit(1)
}
