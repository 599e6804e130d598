//! Devices of arm virt: the PL011 UART and its interrupt through the GICv2
//! (virt's default), semihosting exit, and the device tree QEMU leaves at the
//! start of RAM when it boots firmware (`-bios`).

use crate::mm::{Range, RangeList};

const UART: usize = 0x0900_0000;
const UART_DATA: usize = UART;
const UART_FLAGS: usize = UART + 0x18;
const TX_FULL: u32 = 1 << 5;
const RX_EMPTY: u32 = 1 << 4;
const UART_INTERRUPT_MASK: usize = UART + 0x38;
const RX_INTERRUPT: u32 = 1 << 4;

/// virt's GICv2: distributor, CPU interface, and the UART's line (SPI 1).
const GICD: usize = 0x0800_0000;
const GICC: usize = 0x0801_0000;
const UART_INTID: usize = 32 + 1;

/// The virt machine's device window (GIC, UART, RTC, fw_cfg, GED, memory
/// hotplug registers): identity-mapped as device memory.
pub const DEVICES: Range = Range { start: 0x0800_0000, end: 0x1000_0000 };

fn read32(addr: usize) -> u32 {
    // SAFETY: a register of a device QEMU's virt machine has at this address.
    unsafe { (addr as *const u32).read_volatile() }
}

/// The ACPI memory-hotplug register block, over MMIO on virt.
const MEMORY_HOTPLUG: usize = 0x0907_0000;
const CLEAR_REMOVE: u8 = 1 << 2;
const EJECT: u8 = 1 << 3;

/// Acknowledges the removal request of memory slot `slot` and ejects it.
pub fn eject_memory_slot(slot: u32) {
    // SAFETY: registers of the virt machine's memory-hotplug block, mapped as device memory.
    unsafe {
        (MEMORY_HOTPLUG as *mut u32).write_volatile(slot);
        ((MEMORY_HOTPLUG + 0x14) as *mut u8).write_volatile(CLEAR_REMOVE);
        ((MEMORY_HOTPLUG + 0x14) as *mut u8).write_volatile(EJECT);
    }
}

fn write32(addr: usize, value: u32) {
    // SAFETY: a register of a device QEMU's virt machine has at this address.
    unsafe { (addr as *mut u32).write_volatile(value) }
}

/// Routes the UART's interrupt to this CPU through the GIC. IRQs stay masked
/// in PSTATE: the interrupt is never taken, it only ends a `wfi`.
pub fn gic_init() {
    const ENABLE: u32 = 1;
    // GICD_ISENABLERn: the UART's line.
    write32(GICD + 0x100 + UART_INTID / 32 * 4, 1 << (UART_INTID % 32));
    // SAFETY: byte-wide GICD_ITARGETSRn field of the UART's line: CPU 0.
    unsafe { ((GICD + 0x800 + UART_INTID) as *mut u8).write_volatile(1) };
    write32(GICD, ENABLE); // GICD_CTLR
    write32(GICC + 0x4, 0xf0); // GICC_PMR: every priority but the lowest passes
    write32(GICC, ENABLE); // GICC_CTLR
}

/// Waits in `wfi` until the UART has a byte. The receive interrupt is
/// enabled only here, so that the line is quiet while commands run.
pub fn wait_for_console() {
    write32(UART_INTERRUPT_MASK, RX_INTERRUPT);
    if read32(UART_FLAGS) & RX_EMPTY != 0 {
        // SAFETY: `wfi` only waits; a pending interrupt (the byte that came
        // after the check above) ends it at once, masked or not.
        unsafe { core::arch::asm!("wfi", options(nomem, nostack)) };
    }
    write32(UART_INTERRUPT_MASK, 0);
}

pub fn console_write(bytes: &[u8]) {
    for &b in bytes {
        while read32(UART_FLAGS) & TX_FULL != 0 {
            core::hint::spin_loop();
        }
        // SAFETY: as for `read32`.
        unsafe { (UART_DATA as *mut u32).write_volatile(b as u32) };
    }
}

pub fn console_read() -> Option<u8> {
    (read32(UART_FLAGS) & RX_EMPTY == 0).then(|| read32(UART_DATA) as u8)
}

/// Semihosting SYS_EXIT with ADP_Stopped_ApplicationExit: QEMU exits with `status`.
pub fn exit(status: u8) -> ! {
    const SYS_EXIT: u64 = 0x18;
    const APPLICATION_EXIT: u64 = 0x20026;
    let block = [APPLICATION_EXIT, status as u64];
    loop {
        // SAFETY: the semihosting call ends the VM; `block` outlives it.
        unsafe { core::arch::asm!("hlt #0xf000", in("x0") SYS_EXIT, in("x1") block.as_ptr(), options(nostack)) };
    }
}

/// Where QEMU places the device tree when it starts firmware: the start of RAM.
const FDT_ADDRESS: usize = 0x4000_0000;
const FDT_MAGIC: u32 = 0xd00d_feed;
const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;

fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn cstr(bytes: &[u8], at: usize) -> &[u8] {
    let end = bytes[at..].iter().position(|&b| b == 0).map(|n| at + n).unwrap_or(bytes.len());
    &bytes[at..end]
}

/// Boot RAM from the device tree's `/memory` nodes, and the range the tree
/// itself occupies (to be kept).
pub fn ram_from_device_tree() -> (RangeList, Range) {
    // SAFETY: QEMU put a flattened device tree here; its header gives its size.
    let header = unsafe { core::slice::from_raw_parts(FDT_ADDRESS as *const u8, 40) };
    assert!(be32(header, 0) == FDT_MAGIC, "no device tree at {FDT_ADDRESS:#x}");
    let total = be32(header, 4) as usize;
    // SAFETY: as above, now with the size from the header.
    let fdt = unsafe { core::slice::from_raw_parts(FDT_ADDRESS as *const u8, total) };
    let structs = be32(fdt, 8) as usize;
    let strings = be32(fdt, 12) as usize;

    let mut ram = RangeList::new();
    let (mut address_cells, mut size_cells) = (2usize, 1usize);
    let mut depth = 0;
    let mut in_memory_node = false;
    let mut at = structs;
    loop {
        let token = be32(fdt, at);
        at += 4;
        match token {
            FDT_BEGIN_NODE => {
                let name = cstr(fdt, at);
                at += (name.len() + 4) & !3;
                depth += 1;
                in_memory_node = depth == 2 && (name == b"memory" || name.starts_with(b"memory@"));
            }
            FDT_END_NODE => {
                depth -= 1;
                in_memory_node = false;
            }
            FDT_PROP => {
                let len = be32(fdt, at) as usize;
                let name = cstr(fdt, strings + be32(fdt, at + 4) as usize);
                let value = &fdt[at + 8..at + 8 + len];
                at += 8 + ((len + 3) & !3);
                match (depth, name) {
                    (1, b"#address-cells") => address_cells = be32(value, 0) as usize,
                    (1, b"#size-cells") => size_cells = be32(value, 0) as usize,
                    (2, b"reg") if in_memory_node => {
                        let cell = |i: usize| be32(value, i * 4) as u64;
                        let number =
                            |first: usize, count: usize| (0..count).fold(0u64, |n, i| (n << 32) | cell(first + i));
                        let entry = address_cells + size_cells;
                        for e in 0..len / 4 / entry {
                            let start = number(e * entry, address_cells);
                            let size = number(e * entry + address_cells, size_cells);
                            ram.push(Range::new(start, size));
                        }
                    }
                    _ => {}
                }
            }
            FDT_NOP => {}
            FDT_END => break,
            other => panic!("bad device tree token {other:#x} at offset {at:#x}"),
        }
    }
    (ram, Range::new(FDT_ADDRESS as u64, total as u64))
}
