//! Every architecture's page-table entry format. Each lives beside its
//! architecture (arch/<name>/pagetable.rs) but is compiled on every target,
//! so that the host tests exercise all of them; the architecture's module
//! names its own as `arch::Format`.

#[path = "arch/aarch64/pagetable.rs"]
pub mod aarch64;
#[path = "arch/powerpc64/pagetable.rs"]
pub mod powerpc64;
#[path = "arch/x86_64/pagetable.rs"]
pub mod x86_64;
