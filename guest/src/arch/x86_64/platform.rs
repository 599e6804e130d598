//! Devices of q35: the 16550 UART at I/O port 0x3f8 and its interrupt through
//! the 8259 PIC, `isa-debug-exit` at 0xf4, and the PVH start-of-day information.

use crate::mm::{Range, RangeList};

const COM1: u16 = 0x3f8;
const LINE_STATUS: u16 = COM1 + 5;
const DATA_READY: u8 = 1 << 0;
const TX_EMPTY: u8 = 1 << 5;
const INTERRUPT_ENABLE: u16 = COM1 + 1;
const FIFO_CONTROL: u16 = COM1 + 2;
const FIFO_ENABLE: u8 = 1 << 0;
const FIFO_CLEAR: u8 = 0b11 << 1;
/// The receive trigger level is also how many bytes QEMU moves into the FIFO
/// at a time: 14 while a line streams in, 1 while halted so that the first
/// byte raises the interrupt (below 14 bytes QEMU would otherwise wait for
/// the 4-character timeout, 350 us at 115200 baud).
const TRIGGER_14: u8 = 0b11 << 6;
const TRIGGER_1: u8 = 0;
const RX_DATA_INTERRUPT: u8 = 1 << 0;
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
    outb(INTERRUPT_ENABLE, 0); // none but while `wait_for_console` halts
    outb(COM1 + 3, 0x80); // divisor latch
    outb(COM1, 0x01); // 115200 baud: divisor 1 (low byte)
    outb(COM1 + 1, 0x00); // divisor high byte, while the latch is open
    outb(COM1 + 3, 0x03); // 8N1
    outb(FIFO_CONTROL, FIFO_ENABLE | FIFO_CLEAR | TRIGGER_14);
    outb(COM1 + 4, 0x0b); // DTR, RTS, and OUT2, which gates the IRQ line on a PC
    pic_init();
}

/// The 8259 pair: remapped above the exceptions, every line masked but the
/// UART's (ISA IRQ 4, vector [`CONSOLE_VECTOR`]), and delivered through the
/// local APIC's LINT0 as ExtINT (the boot loader leaves LINT0 masked). Runs
/// on the boot trampoline's tables, which identity-map the APIC's page.
fn pic_init() {
    const LAPIC_LVT_LINT0: usize = 0xfee0_0350;
    const DELIVERY_EXTINT: u32 = 0b111 << 8;
    // SAFETY: the local APIC's LINT0 register at its architectural address,
    // identity-mapped by the boot trampoline's first 4 GiB.
    unsafe { (LAPIC_LVT_LINT0 as *mut u32).write_volatile(DELIVERY_EXTINT) };
    const SLAVE: u16 = 0xa0;
    const INIT_WITH_ICW4: u8 = 0x11;
    for (port, base, cascade) in [(MASTER, PIC_VECTOR_BASE, 1 << 2), (SLAVE, PIC_VECTOR_BASE + 8, 2)] {
        outb(port, INIT_WITH_ICW4);
        outb(port + 1, base);
        outb(port + 1, cascade);
        outb(port + 1, 0x01); // 8086 mode
    }
    outb(MASTER + 1, !(1 << COM1_IRQ));
    outb(SLAVE + 1, 0xff);
}

/// The master 8259's command port (its data port is the next).
const MASTER: u16 = 0x20;
const PIC_VECTOR_BASE: u8 = 0x20;
const COM1_IRQ: u8 = 4;
/// The vector the UART's interrupt arrives on (traps.rs handles it).
pub const CONSOLE_VECTOR: u8 = PIC_VECTOR_BASE + COM1_IRQ;
/// Where the master 8259 reports a line that dropped before it was acknowledged.
pub const SPURIOUS_VECTOR: u8 = PIC_VECTOR_BASE + 7;

/// Halts until the UART has a byte. The receive interrupt is enabled only
/// here: the handler disables it again (dropping the line) and acknowledges
/// the PIC, so it fires once per wait.
pub fn wait_for_console() {
    outb(FIFO_CONTROL, FIFO_ENABLE | TRIGGER_1);
    if inb(LINE_STATUS) & DATA_READY == 0 {
        outb(INTERRUPT_ENABLE, RX_DATA_INTERRUPT);
        // SAFETY: `sti; hlt` is the race-free wait: an interrupt already
        // pending is taken at the `hlt` (STI's shadow), so a byte that arrived
        // after the check above still wakes it; interrupts are off again after.
        unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    }
    outb(FIFO_CONTROL, FIFO_ENABLE | TRIGGER_14);
}

/// What the console interrupt handler does: quiet the line, end the interrupt.
pub fn console_interrupt() {
    outb(INTERRUPT_ENABLE, 0);
    const END_OF_INTERRUPT: u8 = 0x20; // non-specific
    outb(MASTER, END_OF_INTERRUPT);
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
