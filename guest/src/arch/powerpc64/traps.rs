//! Interrupts. The CPU vectors to fixed real addresses 0x100..0xfff (VOF's
//! area at boot, free once RAM is known): `install` writes a three-instruction
//! stub every 0x20 bytes there that saves r3, loads its vector number and
//! branches (absolute) to `hvo_trap_common`, which saves the registers and
//! calls `ppc64_trap` in real mode. A data storage
//! interrupt raised by the store in `probe_write` is recovered; anything else
//! is a crash report with the registers, then exit.

use core::fmt::Write;

use crate::mm::VirtAddr;

core::arch::global_asm!(
    r#"
    .section .text
    .set FRAME, 32                      /* ELFv2 minimal frame: back chain, CR, LR, TOC */
    .set SAVE, FRAME + 41 * 8
    .set SIZE, (SAVE + 15) & ~15
    .global hvo_trap_common
hvo_trap_common:
    mtspr 273, %r1                      /* SPRG1 = interrupted r1 */
    addi %r1, %r1, -(288 + SIZE)        /* below the ABI's red zone */
    std %r0, FRAME + 0 * 8(%r1)
    mfspr %r0, 273
    std %r0, FRAME + 1 * 8(%r1)
    std %r2, FRAME + 2 * 8(%r1)
    mfspr %r0, 272
    std %r0, FRAME + 3 * 8(%r1)
    .irp n, 4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    std %r\n, FRAME + \n * 8(%r1)
    .endr
    mfsrr0 %r0
    std %r0, FRAME + 32 * 8(%r1)
    mfsrr1 %r0
    std %r0, FRAME + 33 * 8(%r1)
    mfspr %r0, 19                       /* DAR */
    std %r0, FRAME + 34 * 8(%r1)
    mfspr %r0, 18                       /* DSISR */
    std %r0, FRAME + 35 * 8(%r1)
    mflr %r0
    std %r0, FRAME + 36 * 8(%r1)
    mfctr %r0
    std %r0, FRAME + 37 * 8(%r1)
    mfcr %r0
    std %r0, FRAME + 38 * 8(%r1)
    mfxer %r0
    std %r0, FRAME + 39 * 8(%r1)
    std %r3, FRAME + 40 * 8(%r1)        /* vector */
    mfmsr %r0                           /* Rust may use FP, VMX and VSX */
    oris %r0, %r0, 0x0280
    ori %r0, %r0, 0x2000
    mtmsrd %r0
    isync
    lis %r2, .TOC.@highest
    ori %r2, %r2, .TOC.@higher
    rldicr %r2, %r2, 32, 31
    oris %r2, %r2, .TOC.@h
    ori %r2, %r2, .TOC.@l
    li %r0, 0
    std %r0, 0(%r1)
    addi %r3, %r1, FRAME
    bl ppc64_trap
    ld %r0, FRAME + 32 * 8(%r1)
    mtsrr0 %r0
    ld %r0, FRAME + 33 * 8(%r1)
    mtsrr1 %r0
    ld %r0, FRAME + 36 * 8(%r1)
    mtlr %r0
    ld %r0, FRAME + 37 * 8(%r1)
    mtctr %r0
    ld %r0, FRAME + 38 * 8(%r1)
    mtcr %r0
    ld %r0, FRAME + 39 * 8(%r1)
    mtxer %r0
    ld %r0, FRAME + 0 * 8(%r1)
    ld %r2, FRAME + 2 * 8(%r1)
    ld %r3, FRAME + 3 * 8(%r1)
    .irp n, 4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    ld %r\n, FRAME + \n * 8(%r1)
    .endr
    ld %r1, FRAME + 1 * 8(%r1)
    rfid

    .global hvo_probe_write
/* bool hvo_probe_write(u8 *va): read a byte, write it back; 1 if the write faulted. */
hvo_probe_write:
    mr %r4, %r3
    li %r3, 0
    lbz %r5, 0(%r4)
    .global hvo_probe_store
hvo_probe_store:
    stb %r5, 0(%r4)
    .global hvo_probe_resume
hvo_probe_resume:
    blr

    .global hvo_probe_read
/* bool hvo_probe_read(const u64 *va, u64 *out): read the word; 1 if the read faulted. */
hvo_probe_read:
    mr %r5, %r3
    li %r3, 0
    .global hvo_probe_load
hvo_probe_load:
    ld %r6, 0(%r5)
    std %r6, 0(%r4)
    .global hvo_probe_read_resume
hvo_probe_read_resume:
    blr
"#
);

extern "C" {
    fn hvo_trap_common();
    fn hvo_probe_write(va: *mut u8) -> bool;
    static hvo_probe_store: u8;
    static hvo_probe_resume: u8;
    fn hvo_probe_read(va: *const u64, out: *mut u64) -> bool;
    static hvo_probe_load: u8;
    static hvo_probe_read_resume: u8;
}

/// The registers as `hvo_trap_common` saves them.
#[repr(C)]
struct TrapFrame {
    gpr: [u64; 32],
    srr0: u64,
    srr1: u64,
    dar: u64,
    dsisr: u64,
    lr: u64,
    ctr: u64,
    cr: u64,
    xer: u64,
    vector: u64,
}

const DATA_STORAGE: u64 = 0x300;
const VECTORS_START: usize = 0x100;
const VECTORS_END: usize = 0x1000;
/// The shortest distance between two vectors (0x300 and 0x380, 0xf20 and 0xf40).
const STUB_SPACING: usize = 0x20;
const CACHE_LINE: usize = 128;

/// `mtspr SPRG0, r3`.
const SAVE_R3: u32 = 0x7c70_43a6;
/// `li r3, 0` (addi r3, 0, 0): the vector number goes in the low 16 bits.
const LOAD_R3: u32 = 0x3860_0000;
/// `ba 0` (branch absolute): the target goes in bits 25:2.
const BRANCH_ABSOLUTE: u32 = 0x4800_0002;

/// Writes the vector stubs at their real addresses. VOF, which lived there,
/// must not be called afterwards.
pub fn install() {
    let common = hvo_trap_common as *const () as usize as u32;
    // An absolute branch reaches the first 32 MiB; the image is linked there.
    assert!(common < 1 << 25, "trap handler at {common:#x} is out of reach of an absolute branch");
    for vector in (VECTORS_START..VECTORS_END).step_by(STUB_SPACING) {
        let stub = [SAVE_R3, LOAD_R3 | vector as u32, BRANCH_ABSOLUTE | common];
        // SAFETY: 0x100..0x1000 is firmware memory no one uses any more.
        unsafe { core::ptr::copy_nonoverlapping(stub.as_ptr(), vector as *mut u32, stub.len()) };
    }
    for line in (VECTORS_START..VECTORS_END).step_by(CACHE_LINE) {
        // SAFETY: make the copied instructions visible to instruction fetch.
        unsafe { core::arch::asm!("dcbst 0, {0}", "sync", "icbi 0, {0}", in(reg) line, options(nostack)) };
    }
    // SAFETY: a context-synchronizing instruction.
    unsafe { core::arch::asm!("sync", "isync", options(nostack)) };
}

pub fn probe_write(va: VirtAddr) -> bool {
    // SAFETY: the probe reads the byte and writes the same value back; a fault
    // on the write is recovered by `ppc64_trap`.
    unsafe { hvo_probe_write(va.0 as *mut u8) }
}

/// The word at `va`, or `None` when the read faulted.
pub fn probe_read(va: VirtAddr) -> Option<u64> {
    let mut word = 0;
    // SAFETY: a fault on the load is recovered by `ppc64_trap`; `word` is ours.
    let faulted = unsafe { hvo_probe_read(va.0 as *const u64, &mut word) };
    (!faulted).then_some(word)
}

#[no_mangle]
extern "C" fn ppc64_trap(frame: &mut TrapFrame) {
    // The probes' one access each: resumed after it, reporting the fault.
    let probes = [
        (core::ptr::addr_of!(hvo_probe_store) as u64, core::ptr::addr_of!(hvo_probe_resume) as u64),
        (core::ptr::addr_of!(hvo_probe_load) as u64, core::ptr::addr_of!(hvo_probe_read_resume) as u64),
    ];
    if let Some(&(_, resume)) = probes.iter().find(|(at, _)| frame.vector == DATA_STORAGE && frame.srr0 == *at) {
        frame.srr0 = resume;
        frame.gpr[3] = 1;
        return;
    }
    let what = match frame.vector {
        DATA_STORAGE => "data storage interrupt",
        0x400 => "instruction storage interrupt",
        0x600 => "alignment interrupt",
        0x700 => "program interrupt",
        _ => "interrupt",
    };
    crate::crash(
        format_args!("{what} at vector {:#x}: DAR {:#x} DSISR {:#x}", frame.vector, frame.dar, frame.dsisr),
        &|c| {
            let _ = writeln!(
                c,
                "srr0={:#018x} srr1={:#018x} lr={:#018x} ctr={:#x}",
                frame.srr0, frame.srr1, frame.lr, frame.ctr
            );
            let _ =
                writeln!(c, "dar={:#018x} dsisr={:#x} cr={:#x} xer={:#x}", frame.dar, frame.dsisr, frame.cr, frame.xer);
            for (i, regs) in frame.gpr.chunks(4).enumerate() {
                let _ = write!(c, "r{:<2}", i * 4);
                for v in regs {
                    let _ = write!(c, " {v:#018x}");
                }
                let _ = writeln!(c);
            }
        },
    )
}
