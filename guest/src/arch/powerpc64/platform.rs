//! pseries services: hypercalls for the console and little-endian interrupts,
//! RTAS for power-off, and VOF's client interface for the memory nodes.

use crate::mm::{Range, RangeList};

const H_GET_TERM_CHAR: u64 = 0x54;
const H_PUT_TERM_CHAR: u64 = 0x58;
const H_SET_MODE: u64 = 0x31c;
pub const H_REGISTER_PROC_TBL: u64 = 0x37c;
/// QEMU's private hypercalls: RTAS and the VOF client interface.
const KVMPPC_H_RTAS: u64 = 0xf000;
const KVMPPC_H_VOF_CLIENT: u64 = 0xf005;
/// vterm 0: QEMU routes it to the default spapr-vty.
const VTERM: u64 = 0;

/// A hypercall: opcode in r3, arguments in r4.., results back in r3..r6.
pub fn hcall(opcode: u64, args: [u64; 4]) -> [u64; 4] {
    let (r3, r4, r5, r6): (u64, u64, u64, u64);
    // SAFETY: `sc 1` enters the hypervisor, which follows the C calling
    // convention for what it preserves.
    unsafe {
        core::arch::asm!(
            "sc 1",
            inout("r3") opcode => r3,
            inout("r4") args[0] => r4,
            inout("r5") args[1] => r5,
            inout("r6") args[2] => r6,
            inout("r7") args[3] => _,
            clobber_abi("C"),
        );
    }
    [r3, r4, r5, r6]
}

/// Interrupts are delivered little-endian (MSR[ILE]).
pub fn little_endian_interrupts() {
    const LITTLE_ENDIAN: u64 = 1;
    const RESOURCE_LE: u64 = 4;
    let [status, ..] = hcall(H_SET_MODE, [LITTLE_ENDIAN, RESOURCE_LE, 0, 0]);
    assert!(status == 0, "H_SET_MODE(LE) failed: {status}");
}

/// pseries completes a DIMM's removal without the guest when the guest never
/// negotiated dynamic reconfiguration with the platform, as this one does not.
pub fn eject_memory_slot(_slot: u32) {}

pub fn console_write(bytes: &[u8]) {
    for chunk in bytes.chunks(16) {
        let mut packed = [0u8; 16];
        packed[..chunk.len()].copy_from_slice(chunk);
        let hi = u64::from_be_bytes(packed[..8].try_into().unwrap_or_default());
        let lo = u64::from_be_bytes(packed[8..].try_into().unwrap_or_default());
        hcall(H_PUT_TERM_CHAR, [VTERM, chunk.len() as u64, hi, lo]);
    }
}

/// Bytes H_GET_TERM_CHAR returned that were not consumed yet (up to 16).
static mut PENDING: ([u8; 16], usize, usize) = ([0; 16], 0, 0);

pub fn console_read() -> Option<u8> {
    // SAFETY: the firmware is single-threaded and traps never read the console.
    let pending = unsafe { &mut *core::ptr::addr_of_mut!(PENDING) };
    if pending.1 == pending.2 {
        let [status, count, hi, lo] = hcall(H_GET_TERM_CHAR, [VTERM, 0, 0, 0]);
        if status != 0 || count == 0 {
            return None;
        }
        pending.0[..8].copy_from_slice(&hi.to_be_bytes());
        pending.0[8..].copy_from_slice(&lo.to_be_bytes());
        pending.1 = 0;
        pending.2 = (count as usize).min(16);
    }
    let byte = pending.0[pending.1];
    pending.1 += 1;
    Some(byte)
}

/// RTAS calls take big-endian 32-bit cells: token, nargs, nret, args, rets.
#[repr(C, align(8))]
struct RtasArgs([u32; 8]);

pub fn exit(status: u8) -> ! {
    const POWER_OFF: u32 = 0x2003;
    const OS_TERM: u32 = 0x201f;
    // QEMU exits 0 on power-off and 1 on ibm,os-term (-action panic=exit-failure):
    // only success and failure survive.
    static REASON: &[u8] = b"hvo-guest failure\0";
    let mut args = if status == 0 {
        RtasArgs([POWER_OFF.to_be(), 2u32.to_be(), 1u32.to_be(), 0, 0, 0, 0, 0])
    } else {
        RtasArgs([OS_TERM.to_be(), 1u32.to_be(), 1u32.to_be(), (REASON.as_ptr() as u32).to_be(), 0, 0, 0, 0])
    };
    loop {
        hcall(KVMPPC_H_RTAS, [core::ptr::addr_of_mut!(args) as u64, 0, 0, 0]);
    }
}

/// A call into VOF's client interface: big-endian 32-bit cells.
#[repr(C, align(8))]
struct ClientArgs {
    service: u32,
    nargs: u32,
    nret: u32,
    cells: [u32; 10],
}

/// The 32-bit address of a string for the client interface (the image lies
/// in the first 4 GiB).
fn cell(s: &'static core::ffi::CStr) -> u32 {
    s.as_ptr() as u32
}

fn client_call(service: &'static core::ffi::CStr, args: &[u32], nret: usize) -> u32 {
    let mut call = ClientArgs {
        service: cell(service).to_be(),
        nargs: (args.len() as u32).to_be(),
        nret: (nret as u32).to_be(),
        cells: [0; 10],
    };
    for (cell, a) in call.cells.iter_mut().zip(args) {
        *cell = a.to_be();
    }
    let [status, ..] = hcall(KVMPPC_H_VOF_CLIENT, [core::ptr::addr_of_mut!(call) as u64, 0, 0, 0]);
    assert!(status == 0, "VOF client call failed: {status}");
    u32::from_be(call.cells[args.len()])
}

/// Boot RAM: every node under the root with `device_type = "memory"`. pseries
/// splits RAM into a node for the RMA and nodes after it.
pub fn ram_from_firmware() -> RangeList {
    let mut ram = RangeList::new();
    let root = client_call(c"finddevice", &[cell(c"/")], 1);
    let mut node = client_call(c"child", &[root], 1);
    let mut buf = [0u8; 128];
    while node != 0 && node != u32::MAX {
        let len = client_call(c"getprop", &[node, cell(c"device_type"), buf.as_mut_ptr() as u32, 16], 1);
        if len != u32::MAX && buf[..(len as usize).min(16)].starts_with(b"memory") {
            let len = client_call(c"getprop", &[node, cell(c"reg"), buf.as_mut_ptr() as u32, 128], 1);
            // pseries: #address-cells = #size-cells = 2 at the root.
            for entry in buf[..(len as usize).min(128)].chunks_exact(16) {
                let start = u64::from_be_bytes(entry[..8].try_into().unwrap_or_default());
                let size = u64::from_be_bytes(entry[8..].try_into().unwrap_or_default());
                ram.push(Range::new(start, size));
            }
        }
        node = client_call(c"peer", &[node], 1);
    }
    ram
}
