//! The guest's console: a log of every line with its time, and the command
//! channel of the line protocol in `hvo_abi::protocol`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hvo_abi::protocol::{parse_guest_line, Command, GuestLine, Request};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// Why talking to the guest failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ConsoleError {
    #[error("no answer to `{command}` within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("the guest crashed: {0}")]
    Crash(String),
    #[error("the console closed (QEMU exited)")]
    Closed,
    #[error("the guest refused `{command}`: {message}")]
    Refused { command: String, message: String },
    #[error("the guest announced ABI {found} for {arch}, the host speaks ABI {expected}")]
    AbiMismatch { found: u32, expected: u32, arch: String },
    #[error("writing to the console failed: {0}")]
    Write(String),
}

/// What the reader task passes on: protocol lines only.
#[derive(Debug)]
enum Event {
    Ready { abi: u32, arch: String },
    Reply { seq: Option<u64>, outcome: Result<String, String> },
    Crash(String),
}

/// Every line the guest printed, with the seconds since the run started.
#[derive(Clone, Default)]
pub struct ConsoleLog {
    lines: Arc<Mutex<Vec<(f64, String)>>>,
    /// Also print every line on standard error as it comes (`xtask repro`).
    echo: Arc<std::sync::atomic::AtomicBool>,
}

impl ConsoleLog {
    fn push(&self, t: f64, line: String) {
        if self.echo.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!("[{t:9.4}] console {line}");
        }
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).push((t, line));
    }

    /// Prints the lines so far on standard error, and every later one as it comes.
    pub fn echo(&self) {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        for (t, l) in lines.iter() {
            eprintln!("[{t:9.4}] console {l}");
        }
        self.echo.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn text(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().map(|(t, l)| format!("[{t:9.4}] {l}\n")).collect()
    }

    /// The last `n` lines, for failure messages.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines[lines.len().saturating_sub(n)..].iter().map(|(_, l)| l.clone()).collect()
    }

    /// Lines that follow the crash line (registers), for crash verdicts.
    pub fn lines_from(&self, pattern: &str) -> Vec<String> {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        match lines.iter().rposition(|(_, l)| l.contains(pattern)) {
            Some(i) => lines[i..].iter().map(|(_, l)| l.clone()).collect(),
            None => Vec::new(),
        }
    }
}

pub struct Console {
    writer: OwnedWriteHalf,
    events: mpsc::UnboundedReceiver<Event>,
    log: ConsoleLog,
    next_seq: u64,
    /// A crash seen while waiting for something else: every later call reports it.
    crashed: Option<String>,
}

/// The longest line kept; a guest printing garbage without newlines cannot
/// make the host buffer without bound.
const MAX_KEPT_LINE: usize = 4096;

impl Console {
    /// Starts reading a console connection QEMU made to us.
    pub fn attach(stream: UnixStream, start: Instant) -> Console {
        let (read, writer) = stream.into_split();
        let (tx, events) = mpsc::unbounded_channel();
        let log = ConsoleLog::default();
        let task_log = log.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(read);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match (&mut reader).take(MAX_KEPT_LINE as u64).read_until(b'\n', &mut raw).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let text = String::from_utf8_lossy(&raw);
                let line = text.trim_end_matches(['\n', '\r']);
                task_log.push(start.elapsed().as_secs_f64(), line.to_string());
                let event = match parse_guest_line(line) {
                    GuestLine::Ready { abi, arch } => Event::Ready { abi, arch: arch.to_string() },
                    GuestLine::Reply { seq, outcome } => {
                        Event::Reply { seq, outcome: outcome.map(str::to_string).map_err(str::to_string) }
                    }
                    GuestLine::Crash(msg) => Event::Crash(msg.to_string()),
                    GuestLine::Text(_) => continue,
                };
                if tx.send(event).is_err() {
                    break;
                }
            }
        });
        Console { writer, events, log, next_seq: 1, crashed: None }
    }

    pub fn log(&self) -> &ConsoleLog {
        &self.log
    }

    async fn next_event(&mut self, deadline: tokio::time::Instant) -> Result<Option<Event>, ()> {
        tokio::time::timeout_at(deadline, self.events.recv()).await.map_err(|_| ())
    }

    /// Waits for the guest's `ready` line and checks it speaks our ABI.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<String, ConsoleError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.next_event(deadline).await {
                Err(()) => return Err(ConsoleError::Timeout { command: "boot".into(), timeout }),
                Ok(None) => return Err(self.closed()),
                Ok(Some(Event::Crash(m))) => return Err(self.crash(m)),
                Ok(Some(Event::Ready { abi, arch })) => {
                    let expected = hvo_abi::manifest::ABI_VERSION;
                    if abi != expected {
                        return Err(ConsoleError::AbiMismatch { found: abi, expected, arch });
                    }
                    return Ok(arch);
                }
                Ok(Some(Event::Reply { .. })) => continue,
            }
        }
    }

    /// Sends one command and waits for its reply; returns the reply's payload.
    pub async fn request(&mut self, command: Command<'_>, timeout: Duration) -> Result<String, ConsoleError> {
        self.request_line(|seq| Request { seq, command }.to_string(), timeout).await
    }

    /// Sends the line `line(seq)` (a request in the protocol's framing,
    /// such as a real kernel's agent takes) and waits for its reply.
    pub async fn request_line(
        &mut self,
        line: impl FnOnce(u64) -> String,
        timeout: Duration,
    ) -> Result<String, ConsoleError> {
        if let Some(m) = &self.crashed {
            return Err(ConsoleError::Crash(m.clone()));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let line = line(seq);
        self.send_raw(format!("{line}\n").as_bytes()).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.next_event(deadline).await {
                Err(()) => return Err(ConsoleError::Timeout { command: line, timeout }),
                Ok(None) => return Err(self.closed()),
                Ok(Some(Event::Crash(m))) => return Err(self.crash(m)),
                // Replies to other lines (stale ones, or `-` for lines the guest
                // could not read at all) are not answers: ours always carry `seq`.
                Ok(Some(Event::Reply { seq: Some(reply_seq), outcome })) if reply_seq == seq => {
                    return outcome.map_err(|message| ConsoleError::Refused { command: line.clone(), message });
                }
                Ok(Some(_)) => continue,
            }
        }
    }

    /// Writes bytes as they are (for tests that feed the guest garbage).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ConsoleError> {
        self.writer.write_all(bytes).await.map_err(|e| ConsoleError::Write(e.to_string()))
    }

    fn crash(&mut self, message: String) -> ConsoleError {
        self.crashed = Some(message.clone());
        ConsoleError::Crash(message)
    }

    fn closed(&self) -> ConsoleError {
        match &self.crashed {
            Some(m) => ConsoleError::Crash(m.clone()),
            None => ConsoleError::Closed,
        }
    }
}
