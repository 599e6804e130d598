//! Devices of q35: the 16550 UART at I/O port 0x3f8, `isa-debug-exit` at 0xf4,
//! and the PVH start-of-day information.

use crate::mm::{Range, RangeList};

const COM1: u16 = 0x3f8;
const LINE_STATUS: u16 = COM1 + 5;
const DATA_READY: u8 = 1 << 0;
const TX_EMPTY: u8 = 1 << 5;
const DEBUG_EXIT_PORT: u16 = 0xf4;

fn outb(port: u16, value: u8) {
    // SAFETY: port I/O to the devices named above has no memory effects.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) }
}

fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe { core::arch::asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags)) }
    value
}

pub fn serial_init() {
    outb(COM1 + 1, 0x00); // no interrupts: the firmware polls
    outb(COM1 + 3, 0x80); // divisor latch
    outb(COM1, 0x01); // 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1
    outb(COM1 + 2, 0xc7); // FIFOs on and cleared
    outb(COM1 + 4, 0x03);
}

/// The ACPI memory-hotplug register block (docs/specs/acpi_mem_hotplug.rst).
const MEMORY_HOTPLUG: u16 = 0xa00;
const SLOT_SELECTOR: u16 = MEMORY_HOTPLUG;
const SLOT_CONTROL: u16 = MEMORY_HOTPLUG + 0x14;
const CLEAR_REMOVE: u8 = 1 << 2;
const EJECT: u8 = 1 << 3;

fn outl(port: u16, value: u32) {
    // SAFETY: port I/O to the memory-hotplug block has no memory effects.
    unsafe { core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) }
}

/// Acknowledges the removal request of memory slot `slot` and ejects it.
pub fn eject_memory_slot(slot: u32) {
    outl(SLOT_SELECTOR, slot);
    outb(SLOT_CONTROL, CLEAR_REMOVE);
    outb(SLOT_CONTROL, EJECT);
}

pub fn console_write(bytes: &[u8]) {
    for &b in bytes {
        while inb(LINE_STATUS) & TX_EMPTY == 0 {
            core::hint::spin_loop();
        }
        outb(COM1, b);
    }
}

pub fn console_read() -> Option<u8> {
    (inb(LINE_STATUS) & DATA_READY != 0).then(|| inb(COM1))
}

pub fn exit(status: u8) -> ! {
    // QEMU exits with (status << 1) | 1.
    outb(DEBUG_EXIT_PORT, status);
    loop {
        // SAFETY: only reached if the exit device is missing; nothing to lose.
        unsafe { core::arch::asm!("cli", "hlt") };
    }
}

const PVH_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
/// Below 1 MiB lie the BIOS data, option ROMs and VGA: never ours.
const LOW_MEMORY_END: u64 = 0x10_0000;

/// `struct hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h), version 1.
#[repr(C)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
struct MemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

/// Boot RAM from the PVH memory map.
pub fn ram_from_start_info(start_info: u32) -> RangeList {
    // SAFETY: the boot loader handed us this address; paging is identity.
    let info = unsafe { &*(start_info as usize as *const StartInfo) };
    assert!(info.magic == PVH_MAGIC, "bad PVH start info magic {:#x}", info.magic);
    assert!(info.version >= 1 && info.memmap_entries > 0, "PVH start info carries no memory map");
    // SAFETY: memmap_entries entries at memmap_paddr, as the protocol says.
    let entries = unsafe {
        core::slice::from_raw_parts(info.memmap_paddr as usize as *const MemmapEntry, info.memmap_entries as usize)
    };
    let mut ram = RangeList::new();
    for e in entries.iter().filter(|e| e.kind == E820_RAM) {
        let start = e.addr.max(LOW_MEMORY_END);
        let end = e.addr + e.size;
        if start < end {
            ram.push(Range { start, end });
        }
    }
    ram
}
