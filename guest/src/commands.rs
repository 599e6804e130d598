//! Serves the host's commands (protocol in `hvo_abi::protocol`).

use hvo_abi::protocol::{parse_request, write_reply_head, Command};

use crate::console::{Console, LineError, LineReader};
use crate::mm::VirtAddr;
use crate::{arch, manifest};

/// Answers commands until told to exit.
pub fn serve() -> ! {
    let mut reader = LineReader::new();
    loop {
        match reader.poll() {
            None => core::hint::spin_loop(),
            Some(Err(LineError::TooLong)) => reply_err(None, format_args!("command too long")),
            Some(Err(LineError::NotText)) => reply_err(None, format_args!("command is not text")),
            Some(Ok(line)) => match parse_request(line) {
                Err((seq, error)) => reply_err(seq, format_args!("{error}")),
                Ok(req) => match req.command {
                    Command::Ping { token } => reply_ok(
                        req.seq,
                        format_args!(
                            "pong{}{}",
                            if token.is_some() { " " } else { "" },
                            token.unwrap_or("")
                        ),
                    ),
                    Command::Report => {
                        let generation = manifest::bump_generation();
                        reply_ok(req.seq, format_args!("generation={generation}"))
                    }
                    Command::ProbeWrite { va } => {
                        let outcome = if arch::probe_write(VirtAddr(va)) {
                            "faulted"
                        } else {
                            "written"
                        };
                        reply_ok(req.seq, format_args!("{outcome}"))
                    }
                    Command::Exit { status } => {
                        reply_ok(req.seq, format_args!("exiting"));
                        arch::exit(status)
                    }
                },
            },
        }
    }
}

fn reply_ok(seq: u64, payload: core::fmt::Arguments) {
    use core::fmt::Write;
    let _ = write_reply_head(&mut Console, Some(seq), true);
    let _ = writeln!(Console, " {payload}");
}

fn reply_err(seq: Option<u64>, message: core::fmt::Arguments) {
    use core::fmt::Write;
    let _ = write_reply_head(&mut Console, seq, false);
    let _ = writeln!(Console, " {message}");
}
