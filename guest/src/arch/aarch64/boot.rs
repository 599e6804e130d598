//! Entry at EL1 from the stub firmware, with the MMU off: enable FP/SIMD
//! (Rust uses NEON registers), zero .bss, set the stack and the exception
//! vectors, then call `aarch64_entry`.

core::arch::global_asm!(
    r#"
    .section .text.boot, "ax"
    .global _start
_start:
    mrs x1, cpacr_el1
    orr x1, x1, #(3 << 20)          /* FPEN: no FP/SIMD traps at EL1 */
    msr cpacr_el1, x1
    isb
    adrp x1, __bss_start
    add x1, x1, :lo12:__bss_start
    adrp x2, __bss_end
    add x2, x2, :lo12:__bss_end
1:  cmp x1, x2
    b.hs 2f
    str xzr, [x1], #8
    b 1b
2:  adrp x1, hvo_boot_stack_top
    add x1, x1, :lo12:hvo_boot_stack_top
    mov sp, x1
    adrp x1, hvo_exception_vectors
    add x1, x1, :lo12:hvo_exception_vectors
    msr vbar_el1, x1
    isb
    bl aarch64_entry
3:  wfe
    b 3b

    .section .bss.boot, "aw", @nobits
    .balign 16
hvo_boot_stack:
    .space 0x10000
hvo_boot_stack_top:
"#
);
