//! Real Linux kernels as guests: the initramfs the harness writes for them
//! (busybox-static, an agent that speaks the console line protocol, and the
//! kernel's own modules it loads) and the kernel symbols the host needs to
//! find the kernel's page tables and vmemmap from outside.

pub mod agent;
pub mod initramfs;
pub mod modules;
pub mod symbols;
pub mod verify;

#[cfg(test)]
mod test_elf;
