//! The console line protocol.
//!
//! Host to guest, one command per line: `<seq> <verb> [args...]`, where `seq` is
//! a decimal number the reply echoes so a late or stray reply can never be taken
//! for the answer to another command.
//!
//! Guest to host, protocol lines start with [`PREFIX`]; anything else is free
//! text (logs, register dumps) that the host keeps for the console log:
//! - `@hvo ready abi=<n> arch=<name>`: the guest serves commands from now on.
//! - `@hvo <seq> ok [payload]` / `@hvo <seq> err <message>`: the reply to a
//!   command; `seq` is `-` when the command was too malformed to carry one.
//!   A command the guest understood but refused answers `err refused=<reason>
//!   <detail>`, the reason one of [`crate::refusal::Refusal`]'s names.
//! - `@hvo crash <message>`: a panic or unexpected exception; register lines
//!   follow as free text and the guest then exits with a failure status.

use core::fmt;

use crate::model::{Knob, Layout, Zone};

pub const PREFIX: &str = "@hvo";
/// The longest line either side sends, newline excluded.
pub const MAX_LINE: usize = 480;

/// A word the host has the guest write into a frame before a read probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Marker {
    /// The physical address of the word (8-byte aligned, in the guest's RAM).
    pub pa: u64,
    pub value: u64,
}

/// A command the host sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// Answered with `ok pong [token]`.
    Ping { token: Option<&'a str> },
    /// The guest rewrites its manifest and answers `ok generation=<n>`.
    Report,
    /// The guest answers `ok`, then exits with this status (0 is success).
    Exit { status: u8 },
    /// The guest panics (the harness's own test of a guest crash).
    Panic,
    /// The guest reads the byte at `va` and writes it back; it answers
    /// `ok faulted` if the write faulted and `ok written` if it did not.
    ProbeWrite { va: u64 },
    /// The guest writes `marker` (when given) into the frame it names
    /// (through its identity map), reads the word at `va`, and puts the
    /// frame's word back; it answers `ok read=<value>` or `ok faulted`.
    /// The host, which walked the tables itself, knows what the read
    /// must see: the marker, or a fault where nothing is mapped.
    ProbeRead { va: u64, marker: Option<Marker> },
    /// Allocate `count` HugeTLB folios of `order` in `zone` as one region,
    /// from boot memory or from the hot-added memory region `from`;
    /// answered with `ok region=<id>`.
    HugetlbAlloc { order: u32, count: u64, zone: Zone, from: Option<u32> },
    /// Restore (if needed) and free a region's folios.
    HugetlbFree { region: u32 },
    /// Optimize a region's vmemmap under `layout`.
    Optimize { region: u32, layout: Layout },
    /// Give a region's vmemmap pages their own frames again.
    Restore { region: u32 },
    /// Turn a bug knob on.
    Knob { knob: Knob },
    /// Before `boot-memmap`: reserve `count` gigantic folios of `order` in
    /// `zone`, to be populated already optimized; answered `ok region=<id>`.
    ReserveGigantic { order: u32, count: u64, zone: Zone },
    /// Populate the boot vmemmap and run memmap init (once).
    BootMemmap,
    /// Fault injection: the `nth` frame allocation from now fails, once
    /// (0 disarms it).
    FailAlloc { nth: u64 },
    /// Hotplugged memory at `start` (`size` bytes) becomes a device-DAX
    /// range of compound pages of `order` in `zone`, its vmemmap populated
    /// under `layout`; with `altmap`, the struct pages are stored at the
    /// start of the range itself. Answered `ok region=<id>`.
    HotAdd { start: u64, size: u64, order: u32, zone: Zone, layout: Layout, altmap: bool },
    /// Before `boot-memmap`: set the last `size` bytes of boot memory aside
    /// as persistent memory (Linux's `memmap=nn!ss`), out of the memmap and
    /// the allocator; answered `ok pmem=<start>`.
    ReservePmem { size: u64 },
    /// Hotplugged memory at `start` becomes ordinary memory in `zone`: its
    /// vmemmap populated and its struct pages initialized; `ok region=<id>`.
    HotAddMemory { start: u64, size: u64, zone: Zone },
    /// Tear down a hot-added range's vmemmap, then eject its memory slot
    /// (none for persistent memory set aside at boot).
    HotRemove { region: u32, slot: Option<u32> },
}

impl Command<'_> {
    pub fn verb(&self) -> &'static str {
        match self {
            Command::Ping { .. } => "ping",
            Command::Report => "report",
            Command::Exit { .. } => "exit",
            Command::Panic => "panic",
            Command::ProbeWrite { .. } => "probe-write",
            Command::ProbeRead { .. } => "probe-read",
            Command::HugetlbAlloc { .. } => "hugetlb-alloc",
            Command::HugetlbFree { .. } => "hugetlb-free",
            Command::Optimize { .. } => "optimize",
            Command::Restore { .. } => "restore",
            Command::Knob { .. } => "knob",
            Command::ReserveGigantic { .. } => "reserve-gigantic",
            Command::BootMemmap => "boot-memmap",
            Command::FailAlloc { .. } => "fail-alloc",
            Command::HotAdd { .. } => "hot-add",
            Command::ReservePmem { .. } => "reserve-pmem",
            Command::HotAddMemory { .. } => "hot-add-memory",
            Command::HotRemove { .. } => "hot-remove",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub seq: u64,
    pub command: Command<'a>,
}

impl fmt::Display for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.seq, self.command.verb())?;
        match self.command {
            Command::Ping { token: Some(t) } => write!(f, " {t}"),
            Command::Ping { token: None } | Command::Report | Command::Panic => Ok(()),
            Command::Exit { status } => write!(f, " {status}"),
            Command::ProbeWrite { va } => write!(f, " {va:#x}"),
            Command::ProbeRead { va, marker: None } => write!(f, " {va:#x}"),
            Command::ProbeRead { va, marker: Some(m) } => write!(f, " {va:#x} {:#x} {:#x}", m.pa, m.value),
            Command::HugetlbAlloc { order, count, zone, from } => {
                write!(f, " {order} {count} {}", zone.name())?;
                match from {
                    Some(region) => write!(f, " {region}"),
                    None => Ok(()),
                }
            }
            Command::HugetlbFree { region } | Command::Restore { region } => write!(f, " {region}"),
            Command::Optimize { region, layout } => write!(f, " {region} {}", layout.name()),
            Command::Knob { knob } => write!(f, " {}", knob.name()),
            Command::ReserveGigantic { order, count, zone } => write!(f, " {order} {count} {}", zone.name()),
            Command::BootMemmap => Ok(()),
            Command::FailAlloc { nth } => write!(f, " {nth}"),
            Command::HotRemove { region, slot: Some(slot) } => write!(f, " {region} {slot}"),
            Command::HotRemove { region, slot: None } => write!(f, " {region}"),
            Command::ReservePmem { size } => write!(f, " {size:#x}"),
            Command::HotAddMemory { start, size, zone } => write!(f, " {start:#x} {size:#x} {}", zone.name()),
            Command::HotAdd { start, size, order, zone, layout, altmap } => {
                let memmap = if altmap { "altmap" } else { "system" };
                write!(f, " {start:#x} {size:#x} {order} {} {} {memmap}", zone.name(), layout.name())
            }
        }
    }
}

/// Why a command line could not be understood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestError<'a> {
    Empty,
    TooLong,
    BadSeq,
    UnknownVerb(&'a str),
    MissingArgument { verb: &'static str, what: &'static str },
    BadArgument { verb: &'static str, what: &'static str },
    ExtraArgument { verb: &'static str },
}

impl fmt::Display for RequestError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::Empty => f.write_str("empty command"),
            RequestError::TooLong => write!(f, "command longer than {MAX_LINE} bytes"),
            RequestError::BadSeq => f.write_str("command must start with a sequence number"),
            RequestError::UnknownVerb(v) => write!(f, "unknown command '{v}'"),
            RequestError::MissingArgument { verb, what } => write!(f, "{verb}: missing {what}"),
            RequestError::BadArgument { verb, what } => write!(f, "{verb}: bad {what}"),
            RequestError::ExtraArgument { verb } => write!(f, "{verb}: too many arguments"),
        }
    }
}

/// A token is printable ASCII without spaces, so replies stay one clean line.
fn valid_token(t: &str) -> bool {
    !t.is_empty() && t.len() <= 64 && t.bytes().all(|b| b.is_ascii_graphic())
}

/// A decimal argument of at most 32 bits.
fn number<'a>(word: Option<&str>, verb: &'static str, what: &'static str) -> Result<u64, RequestError<'a>> {
    let word = word.ok_or(RequestError::MissingArgument { verb, what })?;
    word.parse::<u32>().map(u64::from).map_err(|_| RequestError::BadArgument { verb, what })
}

/// A `0x`-prefixed hexadecimal argument.
fn hex<'a>(word: Option<&str>, verb: &'static str, what: &'static str) -> Result<u64, RequestError<'a>> {
    let word = word.ok_or(RequestError::MissingArgument { verb, what })?;
    word.strip_prefix("0x")
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or(RequestError::BadArgument { verb, what })
}

/// Parses one command line (without its newline). On error, the sequence number
/// is returned too when it could be read, so the reply can carry it.
pub fn parse_request(line: &str) -> Result<Request<'_>, (Option<u64>, RequestError<'_>)> {
    if line.len() > MAX_LINE {
        return Err((None, RequestError::TooLong));
    }
    let mut words = line.split_ascii_whitespace();
    let seq_word = words.next().ok_or((None, RequestError::Empty))?;
    let seq: u64 = seq_word.parse().map_err(|_| (None, RequestError::BadSeq))?;
    let fail = |e| (Some(seq), e);
    let verb = words.next().ok_or(fail(RequestError::MissingArgument { verb: "command", what: "verb" }))?;
    let command = match verb {
        "ping" => {
            let token = words.next();
            if let Some(t) = token {
                if !valid_token(t) {
                    return Err(fail(RequestError::BadArgument { verb: "ping", what: "token" }));
                }
            }
            Command::Ping { token }
        }
        "report" => Command::Report,
        "exit" => {
            let status = words.next().ok_or(fail(RequestError::MissingArgument { verb: "exit", what: "status" }))?;
            let status =
                status.parse::<u8>().map_err(|_| fail(RequestError::BadArgument { verb: "exit", what: "status" }))?;
            Command::Exit { status }
        }
        "probe-write" => Command::ProbeWrite { va: hex(words.next(), "probe-write", "address (0x...)").map_err(fail)? },
        "probe-read" => {
            let verb = "probe-read";
            let va = hex(words.next(), verb, "address (0x...)").map_err(fail)?;
            let marker = match words.next() {
                None => None,
                pa => {
                    let pa = hex(pa, verb, "marker address (0x...)").map_err(fail)?;
                    let value = hex(words.next(), verb, "marker (0x...)").map_err(fail)?;
                    Some(Marker { pa, value })
                }
            };
            Command::ProbeRead { va, marker }
        }
        "hugetlb-alloc" => {
            let verb = "hugetlb-alloc";
            let order = number(words.next(), verb, "order").map_err(fail)?;
            let count = number(words.next(), verb, "count").map_err(fail)?;
            let zone =
                words.next().and_then(Zone::from_name).ok_or(fail(RequestError::BadArgument { verb, what: "zone" }))?;
            let from = match words.next() {
                None => None,
                Some(w) => Some(w.parse().map_err(|_| fail(RequestError::BadArgument { verb, what: "from region" }))?),
            };
            Command::HugetlbAlloc { order: order as u32, count, zone, from }
        }
        "hugetlb-free" => {
            Command::HugetlbFree { region: number(words.next(), "hugetlb-free", "region").map_err(fail)? as u32 }
        }
        "restore" => Command::Restore { region: number(words.next(), "restore", "region").map_err(fail)? as u32 },
        "optimize" => {
            let region = number(words.next(), "optimize", "region").map_err(fail)? as u32;
            let layout = words
                .next()
                .and_then(Layout::from_name)
                .ok_or(fail(RequestError::BadArgument { verb: "optimize", what: "layout" }))?;
            Command::Optimize { region, layout }
        }
        "reserve-gigantic" => {
            let verb = "reserve-gigantic";
            let order = number(words.next(), verb, "order").map_err(fail)?;
            let count = number(words.next(), verb, "count").map_err(fail)?;
            let zone =
                words.next().and_then(Zone::from_name).ok_or(fail(RequestError::BadArgument { verb, what: "zone" }))?;
            Command::ReserveGigantic { order: order as u32, count, zone }
        }
        "boot-memmap" => Command::BootMemmap,
        "panic" => Command::Panic,
        "hot-add" => {
            let verb = "hot-add";
            let start = hex(words.next(), verb, "start").map_err(fail)?;
            let size = hex(words.next(), verb, "size").map_err(fail)?;
            let order = number(words.next(), verb, "order").map_err(fail)? as u32;
            let zone =
                words.next().and_then(Zone::from_name).ok_or(fail(RequestError::BadArgument { verb, what: "zone" }))?;
            let layout = words
                .next()
                .and_then(Layout::from_name)
                .ok_or(fail(RequestError::BadArgument { verb, what: "layout" }))?;
            let altmap = match words.next() {
                Some("altmap") => true,
                Some("system") => false,
                _ => return Err(fail(RequestError::BadArgument { verb, what: "memmap" })),
            };
            Command::HotAdd { start, size, order, zone, layout, altmap }
        }
        "reserve-pmem" => Command::ReservePmem { size: hex(words.next(), "reserve-pmem", "size").map_err(fail)? },
        "hot-add-memory" => {
            let verb = "hot-add-memory";
            let start = hex(words.next(), verb, "start").map_err(fail)?;
            let size = hex(words.next(), verb, "size").map_err(fail)?;
            let zone =
                words.next().and_then(Zone::from_name).ok_or(fail(RequestError::BadArgument { verb, what: "zone" }))?;
            Command::HotAddMemory { start, size, zone }
        }
        "hot-remove" => Command::HotRemove {
            region: number(words.next(), "hot-remove", "region").map_err(fail)? as u32,
            slot: match words.next() {
                None => None,
                slot => Some(number(slot, "hot-remove", "slot").map_err(fail)? as u32),
            },
        },
        "fail-alloc" => Command::FailAlloc { nth: number(words.next(), "fail-alloc", "nth").map_err(fail)? },
        "knob" => {
            let knob = words
                .next()
                .and_then(Knob::from_name)
                .ok_or(fail(RequestError::BadArgument { verb: "knob", what: "knob name" }))?;
            Command::Knob { knob }
        }
        other => return Err(fail(RequestError::UnknownVerb(other))),
    };
    if words.next().is_some() {
        return Err(fail(RequestError::ExtraArgument { verb: command.verb() }));
    }
    Ok(Request { seq, command })
}

/// A line the guest printed, as the host sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestLine<'a> {
    Ready {
        abi: u32,
        arch: &'a str,
    },
    Reply {
        seq: Option<u64>,
        outcome: Result<&'a str, &'a str>,
    },
    Crash(&'a str),
    /// Not a protocol line, or a protocol line the host does not understand.
    Text(&'a str),
}

/// Classifies one console line (without its line ending).
pub fn parse_guest_line(line: &str) -> GuestLine<'_> {
    let Some(rest) = line.strip_prefix(PREFIX).and_then(|r| r.strip_prefix(' ')) else {
        return GuestLine::Text(line);
    };
    if let Some(msg) = rest.strip_prefix("crash") {
        return GuestLine::Crash(msg.trim_start_matches(':').trim());
    }
    if let Some(args) = rest.strip_prefix("ready ") {
        let mut abi = None;
        let mut arch = None;
        for word in args.split_ascii_whitespace() {
            if let Some(v) = word.strip_prefix("abi=") {
                abi = v.parse().ok();
            } else if let Some(v) = word.strip_prefix("arch=") {
                arch = Some(v);
            }
        }
        return match (abi, arch) {
            (Some(abi), Some(arch)) => GuestLine::Ready { abi, arch },
            _ => GuestLine::Text(line),
        };
    }
    let (seq_word, tail) = rest.split_once(' ').unwrap_or((rest, ""));
    let seq = match seq_word {
        "-" => None,
        s => match s.parse() {
            Ok(n) => Some(n),
            Err(_) => return GuestLine::Text(line),
        },
    };
    let (status, payload) = tail.split_once(' ').unwrap_or((tail, ""));
    match status {
        "ok" => GuestLine::Reply { seq, outcome: Ok(payload) },
        "err" => GuestLine::Reply { seq, outcome: Err(payload) },
        _ => GuestLine::Text(line),
    }
}

/// Writes the guest's reply line for a request; `seq` is `None` when the
/// request had no readable sequence number.
pub fn write_reply_head(out: &mut impl fmt::Write, seq: Option<u64>, ok: bool) -> fmt::Result {
    match seq {
        Some(s) => write!(out, "{PREFIX} {s} ")?,
        None => write!(out, "{PREFIX} - ")?,
    }
    out.write_str(if ok { "ok" } else { "err" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for req in [
            Request { seq: 1, command: Command::Ping { token: None } },
            Request { seq: 2, command: Command::Ping { token: Some("abc-1") } },
            Request { seq: 3, command: Command::Report },
            Request { seq: 4, command: Command::Exit { status: 3 } },
            Request { seq: 5, command: Command::ProbeWrite { va: 0xffff_ea00_0000_1000 } },
            Request { seq: 21, command: Command::ProbeRead { va: 0xffff_ea00_0000_1008, marker: None } },
            Request {
                seq: 22,
                command: Command::ProbeRead {
                    va: 0xffff_ea00_0000_1008,
                    marker: Some(Marker { pa: 0x4_2008, value: 0x4856_4f00_0000_0001 }),
                },
            },
            Request { seq: 6, command: Command::HugetlbAlloc { order: 9, count: 8, zone: Zone::Movable, from: None } },
            Request { seq: 7, command: Command::HugetlbFree { region: 2 } },
            Request { seq: 8, command: Command::Optimize { region: 0, layout: Layout::LegacyDax } },
            Request { seq: 9, command: Command::Restore { region: 1 } },
            Request { seq: 10, command: Command::Knob { knob: Knob::NoTlbFlush } },
            Request { seq: 11, command: Command::ReserveGigantic { order: 18, count: 2, zone: Zone::Normal } },
            Request { seq: 12, command: Command::BootMemmap },
            Request { seq: 20, command: Command::Panic },
            Request { seq: 13, command: Command::FailAlloc { nth: 3 } },
            Request { seq: 15, command: Command::HotRemove { region: 2, slot: Some(1) } },
            Request { seq: 18, command: Command::HotRemove { region: 4, slot: None } },
            Request { seq: 19, command: Command::ReservePmem { size: 0x80_0000 } },
            Request {
                seq: 16,
                command: Command::HugetlbAlloc { order: 18, count: 1, zone: Zone::Movable, from: Some(3) },
            },
            Request {
                seq: 17,
                command: Command::HotAddMemory { start: 0x1_0000_0000, size: 0x4000_0000, zone: Zone::Movable },
            },
            Request {
                seq: 14,
                command: Command::HotAdd {
                    start: 0x1_0000_0000,
                    size: 0x100_0000_0000,
                    order: 18,
                    zone: Zone::Device,
                    layout: Layout::Unified,
                    altmap: true,
                },
            },
        ] {
            let line = req.to_string();
            assert_eq!(parse_request(&line), Ok(req), "{line}");
        }
    }

    #[test]
    fn bad_requests_say_why_and_keep_the_seq() {
        assert_eq!(parse_request(""), Err((None, RequestError::Empty)));
        assert_eq!(parse_request("x ping"), Err((None, RequestError::BadSeq)));
        assert_eq!(parse_request("7 frobnicate"), Err((Some(7), RequestError::UnknownVerb("frobnicate"))));
        assert!(matches!(parse_request("8 exit"), Err((Some(8), RequestError::MissingArgument { .. }))));
        assert!(matches!(parse_request("9 exit 300"), Err((Some(9), RequestError::BadArgument { .. }))));
        assert!(matches!(parse_request("9 report now"), Err((Some(9), RequestError::ExtraArgument { .. }))));
        for (line, seq) in [
            ("2 probe-write 4096", 2),
            ("2 probe-read 0x1000 0x2000 zz", 2),
            ("3 optimize 0 sideways", 3),
            ("4 hugetlb-alloc 9 99999999999 normal", 4),
            ("5 hugetlb-alloc 9 1 dma", 5),
            ("6 knob flip-bits", 6),
            ("7 reserve-gigantic 18 x normal", 7),
        ] {
            assert!(
                matches!(parse_request(line), Err((Some(s), RequestError::BadArgument { .. })) if s == seq),
                "{line}"
            );
        }
        let long = "1 ping ".to_string() + &"a".repeat(MAX_LINE);
        assert_eq!(parse_request(&long), Err((None, RequestError::TooLong)));
        assert!(matches!(parse_request("1 ping \u{7f}"), Err((Some(1), RequestError::BadArgument { .. }))));
    }

    #[test]
    fn guest_lines_are_classified() {
        assert_eq!(parse_guest_line("@hvo ready abi=1 arch=ppc64le"), GuestLine::Ready { abi: 1, arch: "ppc64le" });
        assert_eq!(parse_guest_line("@hvo 12 ok pong t"), GuestLine::Reply { seq: Some(12), outcome: Ok("pong t") });
        assert_eq!(parse_guest_line("@hvo 3 ok"), GuestLine::Reply { seq: Some(3), outcome: Ok("") });
        assert_eq!(
            parse_guest_line("@hvo - err unknown command 'x'"),
            GuestLine::Reply { seq: None, outcome: Err("unknown command 'x'") }
        );
        assert_eq!(parse_guest_line("@hvo crash: page fault at 0x10"), GuestLine::Crash("page fault at 0x10"));
        assert_eq!(parse_guest_line("rip=0x1000"), GuestLine::Text("rip=0x1000"));
        assert_eq!(parse_guest_line("@hvo zz ok"), GuestLine::Text("@hvo zz ok"));
        assert_eq!(parse_guest_line("@hvoready"), GuestLine::Text("@hvoready"));
    }

    #[test]
    fn reply_heads() {
        let mut s = String::new();
        write_reply_head(&mut s, Some(5), true).unwrap();
        assert_eq!(s, "@hvo 5 ok");
        s.clear();
        write_reply_head(&mut s, None, false).unwrap();
        assert_eq!(s, "@hvo - err");
    }
}
