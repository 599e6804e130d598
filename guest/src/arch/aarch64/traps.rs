//! Exception vectors (VBAR_EL1). A data abort raised by the store in
//! `probe_write` is recovered; anything else is a crash report with the
//! registers, then exit.

use core::fmt::Write;

use crate::mm::VirtAddr;

core::arch::global_asm!(
    r#"
    .section .text
    .macro HVO_VECTOR kind
    .balign 0x80
    sub sp, sp, #272
    stp x0, x1, [sp, #0]
    mov x0, #\kind
    b hvo_exception_common
    .endm

    .balign 0x800
    .global hvo_exception_vectors
hvo_exception_vectors:
    HVO_VECTOR 0
    HVO_VECTOR 1
    HVO_VECTOR 2
    HVO_VECTOR 3
    HVO_VECTOR 4
    HVO_VECTOR 5
    HVO_VECTOR 6
    HVO_VECTOR 7
    HVO_VECTOR 8
    HVO_VECTOR 9
    HVO_VECTOR 10
    HVO_VECTOR 11
    HVO_VECTOR 12
    HVO_VECTOR 13
    HVO_VECTOR 14
    HVO_VECTOR 15

hvo_exception_common:
    stp x2, x3, [sp, #16]
    stp x4, x5, [sp, #32]
    stp x6, x7, [sp, #48]
    stp x8, x9, [sp, #64]
    stp x10, x11, [sp, #80]
    stp x12, x13, [sp, #96]
    stp x14, x15, [sp, #112]
    stp x16, x17, [sp, #128]
    stp x18, x19, [sp, #144]
    stp x20, x21, [sp, #160]
    stp x22, x23, [sp, #176]
    stp x24, x25, [sp, #192]
    stp x26, x27, [sp, #208]
    stp x28, x29, [sp, #224]
    str x30, [sp, #240]
    mrs x1, elr_el1
    mrs x2, spsr_el1
    stp x1, x2, [sp, #248]
    mov x1, x0
    mov x0, sp
    bl aarch64_exception
    ldp x1, x2, [sp, #248]
    msr elr_el1, x1
    msr spsr_el1, x2
    ldp x2, x3, [sp, #16]
    ldp x4, x5, [sp, #32]
    ldp x6, x7, [sp, #48]
    ldp x8, x9, [sp, #64]
    ldp x10, x11, [sp, #80]
    ldp x12, x13, [sp, #96]
    ldp x14, x15, [sp, #112]
    ldp x16, x17, [sp, #128]
    ldp x18, x19, [sp, #144]
    ldp x20, x21, [sp, #160]
    ldp x22, x23, [sp, #176]
    ldp x24, x25, [sp, #192]
    ldp x26, x27, [sp, #208]
    ldp x28, x29, [sp, #224]
    ldr x30, [sp, #240]
    ldp x0, x1, [sp, #0]
    add sp, sp, #272
    eret

    .global hvo_probe_write
/* bool hvo_probe_write(u8 *va): read a byte, write it back; 1 if the write faulted. */
hvo_probe_write:
    mov x1, x0
    mov x0, #0
    ldrb w2, [x1]
    .global hvo_probe_store
hvo_probe_store:
    strb w2, [x1]
    .global hvo_probe_resume
hvo_probe_resume:
    ret

    .global hvo_probe_read
/* bool hvo_probe_read(const u64 *va, u64 *out): read the word; 1 if the read faulted. */
hvo_probe_read:
    mov x2, x0
    mov x0, #0
    .global hvo_probe_load
hvo_probe_load:
    ldr x3, [x2]
    str x3, [x1]
    .global hvo_probe_read_resume
hvo_probe_read_resume:
    ret
"#
);

extern "C" {
    fn hvo_probe_write(va: *mut u8) -> bool;
    static hvo_probe_store: u8;
    static hvo_probe_resume: u8;
    fn hvo_probe_read(va: *const u64, out: *mut u64) -> bool;
    static hvo_probe_load: u8;
    static hvo_probe_read_resume: u8;
}

/// The stack as `hvo_exception_common` leaves it.
#[repr(C)]
struct ExceptionFrame {
    x: [u64; 31],
    elr: u64,
    spsr: u64,
}

/// Vector 4: synchronous exception from the current EL using SP_ELx.
const SYNC_CURRENT_EL: u64 = 4;
/// ESR_EL1.EC for a data abort taken without a change in exception level.
const EC_DATA_ABORT_SAME_EL: u64 = 0x25;

const VECTOR_NAMES: [&str; 4] = ["synchronous", "IRQ", "FIQ", "SError"];
const VECTOR_ORIGINS: [&str; 4] =
    ["current EL, SP_EL0", "current EL, SP_ELx", "lower EL, AArch64", "lower EL, AArch32"];

pub fn probe_write(va: VirtAddr) -> bool {
    // SAFETY: the probe reads the byte and writes the same value back; a fault
    // on the write is recovered by `aarch64_exception`.
    unsafe { hvo_probe_write(va.0 as *mut u8) }
}

/// The word at `va`, or `None` when the read faulted.
pub fn probe_read(va: VirtAddr) -> Option<u64> {
    let mut word = 0;
    // SAFETY: a fault on the load is recovered by `aarch64_exception`; `word` is ours.
    let faulted = unsafe { hvo_probe_read(va.0 as *const u64, &mut word) };
    (!faulted).then_some(word)
}

fn esr_far() -> (u64, u64) {
    let (esr, far): (u64, u64);
    // SAFETY: reading syndrome registers has no side effects.
    unsafe {
        core::arch::asm!("mrs {}, esr_el1", "mrs {}, far_el1", out(reg) esr, out(reg) far, options(nomem, nostack))
    };
    (esr, far)
}

#[no_mangle]
extern "C" fn aarch64_exception(frame: &mut ExceptionFrame, kind: u64) {
    let (esr, far) = esr_far();
    let class = esr >> 26;
    // The probes' one access each: resumed after it, reporting the fault.
    let probes = [
        (core::ptr::addr_of!(hvo_probe_store) as u64, core::ptr::addr_of!(hvo_probe_resume) as u64),
        (core::ptr::addr_of!(hvo_probe_load) as u64, core::ptr::addr_of!(hvo_probe_read_resume) as u64),
    ];
    let data_abort = kind == SYNC_CURRENT_EL && class == EC_DATA_ABORT_SAME_EL;
    if let Some(&(_, resume)) = probes.iter().find(|(at, _)| data_abort && frame.elr == *at) {
        frame.elr = resume;
        frame.x[0] = 1;
        return;
    }
    let name = VECTOR_NAMES[(kind % 4) as usize];
    let origin = VECTOR_ORIGINS[(kind / 4 % 4) as usize];
    crate::crash(format_args!("{name} exception from {origin}: ESR {esr:#x} (class {class:#x}) FAR {far:#x}"), &|c| {
        let _ = writeln!(c, "elr={:#018x} spsr={:#x} esr={esr:#x} far={far:#x}", frame.elr, frame.spsr);
        for (i, pair) in frame.x.chunks(4).enumerate() {
            let _ = write!(c, "x{:<2}", i * 4);
            for v in pair {
                let _ = write!(c, " {v:#018x}");
            }
            let _ = writeln!(c);
        }
    })
}
