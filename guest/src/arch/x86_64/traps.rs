//! Exceptions and interrupts: an IDT for the 32 architectural vectors and the
//! 8259's 16 lines above them. A page fault raised by the store in
//! `probe_write` is recovered, the console's interrupt wakes
//! `wait_for_console`; anything else is a crash report with the registers,
//! then exit.

use core::fmt::Write;

use super::platform::{console_interrupt, CONSOLE_VECTOR, SPURIOUS_VECTOR};
use crate::mm::VirtAddr;

core::arch::global_asm!(
    r#"
    .section .text
    .macro HVO_VECTOR n, has_error_code
hvo_vector_\n:
    .if \has_error_code == 0
    push 0
    .endif
    push \n
    jmp hvo_trap_common
    .endm

    HVO_VECTOR 0, 0
    HVO_VECTOR 1, 0
    HVO_VECTOR 2, 0
    HVO_VECTOR 3, 0
    HVO_VECTOR 4, 0
    HVO_VECTOR 5, 0
    HVO_VECTOR 6, 0
    HVO_VECTOR 7, 0
    HVO_VECTOR 8, 1
    HVO_VECTOR 9, 0
    HVO_VECTOR 10, 1
    HVO_VECTOR 11, 1
    HVO_VECTOR 12, 1
    HVO_VECTOR 13, 1
    HVO_VECTOR 14, 1
    HVO_VECTOR 15, 0
    HVO_VECTOR 16, 0
    HVO_VECTOR 17, 1
    HVO_VECTOR 18, 0
    HVO_VECTOR 19, 0
    HVO_VECTOR 20, 0
    HVO_VECTOR 21, 1
    HVO_VECTOR 22, 0
    HVO_VECTOR 23, 0
    HVO_VECTOR 24, 0
    HVO_VECTOR 25, 0
    HVO_VECTOR 26, 0
    HVO_VECTOR 27, 0
    HVO_VECTOR 28, 0
    HVO_VECTOR 29, 1
    HVO_VECTOR 30, 1
    HVO_VECTOR 31, 0
    .irp n, 32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
    HVO_VECTOR \n, 0
    .endr

hvo_trap_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    call x86_64_trap
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq

    .section .rodata
    .balign 8
    .global hvo_vector_table
hvo_vector_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
    .quad hvo_vector_\n
    .endr

    .section .text
    .global hvo_probe_write
/* bool hvo_probe_write(u8 *va): read a byte, write it back; 1 if the write faulted. */
hvo_probe_write:
    xor eax, eax
    mov cl, byte ptr [rdi]
    .global hvo_probe_store
hvo_probe_store:
    mov byte ptr [rdi], cl
    .global hvo_probe_resume
hvo_probe_resume:
    ret

    .global hvo_probe_read
/* bool hvo_probe_read(const u64 *va, u64 *out): read the word; 1 if the read faulted. */
hvo_probe_read:
    xor eax, eax
    .global hvo_probe_load
hvo_probe_load:
    mov rcx, qword ptr [rdi]
    mov qword ptr [rsi], rcx
    .global hvo_probe_read_resume
hvo_probe_read_resume:
    ret
"#
);

extern "C" {
    static hvo_vector_table: [u64; VECTORS];
    fn hvo_probe_write(va: *mut u8) -> bool;
    static hvo_probe_store: u8;
    static hvo_probe_resume: u8;
    fn hvo_probe_read(va: *const u64, out: *mut u64) -> bool;
    static hvo_probe_load: u8;
    static hvo_probe_read_resume: u8;
}

const VECTORS: usize = 48;
const PAGE_FAULT: u64 = 14;
const KERNEL_CODE_SELECTOR: u16 = 0x08;

/// The stack as `hvo_trap_common` leaves it.
#[repr(C)]
struct TrapFrame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

#[derive(Clone, Copy)]
#[repr(C, packed)]
struct IdtEntry {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

#[repr(C, packed)]
struct IdtPointer {
    limit: u16,
    base: u64,
}

static mut IDT: [IdtEntry; VECTORS] =
    [IdtEntry { offset_low: 0, selector: 0, ist: 0, type_attr: 0, offset_mid: 0, offset_high: 0, reserved: 0 };
        VECTORS];

pub fn install() {
    // SAFETY: single-threaded boot; the IDT is static and outlives its use.
    unsafe {
        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        for (entry, &handler) in idt.iter_mut().zip(hvo_vector_table.iter()) {
            *entry = IdtEntry {
                offset_low: handler as u16,
                selector: KERNEL_CODE_SELECTOR,
                ist: 0,
                type_attr: 0x8e, // present, ring 0, 64-bit interrupt gate
                offset_mid: (handler >> 16) as u16,
                offset_high: (handler >> 32) as u32,
                reserved: 0,
            };
        }
        let pointer = IdtPointer { limit: (size_of::<[IdtEntry; VECTORS]>() - 1) as u16, base: idt.as_ptr() as u64 };
        core::arch::asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags));
    }
}

pub fn probe_write(va: VirtAddr) -> bool {
    // SAFETY: the probe reads the byte and writes the same value back; a fault
    // on the write is recovered by `x86_64_trap`.
    unsafe { hvo_probe_write(va.0 as *mut u8) }
}

/// The word at `va`, or `None` when the read faulted.
pub fn probe_read(va: VirtAddr) -> Option<u64> {
    let mut word = 0;
    // SAFETY: a fault on the load is recovered by `x86_64_trap`; `word` is ours.
    let faulted = unsafe { hvo_probe_read(va.0 as *const u64, &mut word) };
    (!faulted).then_some(word)
}

fn read_cr2() -> u64 {
    let cr2: u64;
    // SAFETY: reading a control register has no side effects.
    unsafe { core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    cr2
}

#[no_mangle]
extern "C" fn x86_64_trap(frame: &mut TrapFrame) {
    // The probes' one access each: resumed after it, reporting the fault.
    let probes = [
        (core::ptr::addr_of!(hvo_probe_store) as u64, core::ptr::addr_of!(hvo_probe_resume) as u64),
        (core::ptr::addr_of!(hvo_probe_load) as u64, core::ptr::addr_of!(hvo_probe_read_resume) as u64),
    ];
    if let Some(&(_, resume)) = probes.iter().find(|(at, _)| frame.vector == PAGE_FAULT && frame.rip == *at) {
        frame.rip = resume;
        frame.rax = 1;
        return;
    }
    if frame.vector == CONSOLE_VECTOR as u64 {
        console_interrupt();
        return;
    }
    // An 8259 reports a line that dropped before it was acknowledged as its
    // lowest-priority one, without needing an end of interrupt.
    if frame.vector == SPURIOUS_VECTOR as u64 {
        return;
    }
    let cr2 = read_cr2();
    let registers = |c: &mut crate::console::Console| {
        let _ = writeln!(
            c,
            "rip={:#018x} rsp={:#018x} rflags={:#x} cs={:#x} cr2={cr2:#x}",
            frame.rip, frame.rsp, frame.rflags, frame.cs
        );
        let _ = writeln!(
            c,
            "rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}",
            frame.rax, frame.rbx, frame.rcx, frame.rdx
        );
        let _ = writeln!(
            c,
            "rsi={:#018x} rdi={:#018x} rbp={:#018x} r8 ={:#018x}",
            frame.rsi, frame.rdi, frame.rbp, frame.r8
        );
        let _ = writeln!(
            c,
            "r9 ={:#018x} r10={:#018x} r11={:#018x} r12={:#018x}",
            frame.r9, frame.r10, frame.r11, frame.r12
        );
        let _ =
            writeln!(c, "r13={:#018x} r14={:#018x} r15={:#018x} ss={:#x}", frame.r13, frame.r14, frame.r15, frame.ss);
    };
    match frame.vector {
        PAGE_FAULT => {
            crate::crash(format_args!("page fault at {cr2:#x} (error code {:#x})", frame.error_code), &registers)
        }
        v => crate::crash(format_args!("exception vector {v} (error code {:#x})", frame.error_code), &registers),
    }
}
