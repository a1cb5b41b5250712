//! Starting a stdio downstream: its own process group, its stderr in our log, and (through
//! conductor's own executable) a parent-death signal, so it does not outlive conductor.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::OnceLock;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use process_wrap::tokio::{ChildWrapper, CommandWrap, KillOnDrop, ProcessGroup};
use rmcp::service::{RoleClient, RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{ChildStderr, ChildStdout};

use super::ConnectError;
use super::lane::TextLane;
use crate::config::{ServerName, StdioSpec};
use crate::wire::{LineTransport, Writer};

/// A child's pipes as rmcp's transport, and the text lane for its tool calls.
pub(super) struct Child {
    pub transport: ChildTransport,
    pub lane: Arc<TextLane>,
    pub pid: Option<u32>,
    /// The last lines the child wrote to stderr: why it failed, when it does.
    pub stderr: StderrTail,
}

/// The last few lines a child wrote to stderr, each cut to a readable length, and whether
/// its stderr has ended (the child exited).
#[derive(Debug, Clone, Default)]
pub(super) struct StderrTail(Arc<Tail>);

#[derive(Debug, Default)]
struct Tail {
    lines: std::sync::Mutex<std::collections::VecDeque<String>>,
    ended: tokio::sync::watch::Sender<bool>,
}

/// How many of a child's last stderr lines a start-up failure shows, and how long each may be.
const TAIL_LINES: usize = 5;
const TAIL_LINE_CHARS: usize = 300;

impl StderrTail {
    fn push(&self, line: &str) {
        let line: String = line.chars().take(TAIL_LINE_CHARS).collect();
        if let Ok(mut lines) = self.0.lines.lock() {
            if lines.len() == TAIL_LINES {
                lines.pop_front();
            }
            lines.push_back(line);
        }
    }

    fn end(&self) {
        self.0.ended.send_replace(true);
    }

    /// The lines, once stderr has ended or `wait` has passed (a child that failed its
    /// handshake is usually exiting, and its last words are still on their way).
    pub async fn last_words(&self, wait: std::time::Duration) -> Vec<String> {
        let mut ended = self.0.ended.subscribe();
        let _ = tokio::time::timeout(wait, ended.wait_for(|ended| *ended)).await;
        self.0
            .lines
            .lock()
            .map(|lines| lines.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// Spawn the child. It leads its own process group, so stopping it also stops whatever it
/// started (an `npx` wrapper's node process, a shell's children), and it is killed if the
/// handle is dropped. `max_line` is the longest message read from it.
pub(super) fn spawn(
    server: &ServerName,
    spec: &StdioSpec,
    max_line: usize,
) -> Result<Child, ConnectError> {
    if !spec.cwd.is_dir() {
        return Err(ConnectError::Spawn {
            command: spec.command.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("its folder `{}` does not exist", spec.cwd.display()),
            ),
        });
    }
    let program = find_program(spec).ok_or_else(|| ConnectError::Spawn {
        command: spec.command.clone(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            if spec.command.contains('/') {
                "no such file"
            } else {
                "not found on `PATH`"
            },
        ),
    })?;
    let mut command = match LAUNCHER.get() {
        Some(launcher) => {
            let mut command = tokio::process::Command::new(launcher);
            command
                .arg(LAUNCHER_ARG)
                .arg(std::process::id().to_string())
                .arg(&program);
            command
        }
        None => tokio::process::Command::new(&program),
    };
    command
        .args(&spec.args)
        .env_clear()
        .envs(child_env(spec, |name| std::env::var_os(name)))
        .current_dir(&spec.cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut wrapped = CommandWrap::from(command);
    wrapped.wrap(ProcessGroup::leader()).wrap(KillOnDrop);
    let spawn_error = |source| ConnectError::Spawn {
        command: spec.command.clone(),
        source,
    };
    let mut child = wrapped.spawn().map_err(spawn_error)?;
    let pipes = (
        child.stdin().take(),
        child.stdout().take(),
        child.stderr().take(),
    );
    let (Some(stdin), Some(stdout), stderr) = pipes else {
        return Err(spawn_error(std::io::Error::other(
            "the child's pipes were not opened",
        )));
    };
    let tail = StderrTail::default();
    match stderr {
        Some(stderr) => {
            tokio::spawn(forward_stderr(server.clone(), stderr, tail.clone()));
        }
        None => tail.end(),
    }
    let pid = child.id();
    let writer = Writer::new(stdin);
    let lane = Arc::new(TextLane::new(writer.clone(), max_line));
    let transport = ChildTransport {
        lines: LineTransport::new(stdout, writer, lane.clone(), max_line),
        child: Some(child),
        server: server.clone(),
    };
    Ok(Child {
        transport,
        lane,
        pid,
        stderr: tail,
    })
}

/// What a child sees of conductor's environment without asking: what the official SDKs' stdio
/// clients pass (HOME, LOGNAME, PATH, SHELL, TERM, USER), and the locale, time zone and
/// temporary folder, which hold no secrets and change how a program behaves.
pub const SAFE_ENV: [&str; 10] = [
    "HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER", "LANG", "LC_ALL", "TZ", "TMPDIR",
];

/// A child's whole environment: the safe set and what its config lets it inherit, read from
/// conductor's environment through `inherited`, then its own `env` over both.
fn child_env(
    spec: &StdioSpec,
    inherited: impl Fn(&str) -> Option<OsString>,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = SAFE_ENV
        .iter()
        .copied()
        .chain(spec.inherit_env.iter().map(String::as_str))
        .filter_map(|name| Some((OsString::from(name), inherited(name)?)))
        .collect();
    env.extend(
        spec.env
            .iter()
            .map(|(key, value)| (OsString::from(key), OsString::from(value))),
    );
    env
}

/// rmcp's transport to a child: its pipes, and the child, stopped when the transport closes
/// and killed if it is dropped.
pub(super) struct ChildTransport {
    lines: LineTransport<RoleClient, ChildStdout>,
    child: Option<Box<dyn ChildWrapper>>,
    server: ServerName,
}

/// How long a child gets to exit after its stdin closes, and again after SIGTERM.
const EXIT_WAIT: Duration = Duration::from_secs(3);

impl Transport<RoleClient> for ChildTransport {
    type Error = std::io::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleClient>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        self.lines.send(item)
    }

    fn receive(&mut self) -> impl Future<Output = Option<RxJsonRpcMessage<RoleClient>>> + Send {
        self.lines.receive()
    }

    /// As the MCP specification's stdio shutdown: close its stdin, wait; SIGTERM, wait; kill.
    /// (`Connection::close` signals the whole group on its own schedule meanwhile.)
    async fn close(&mut self) -> Result<(), Self::Error> {
        self.lines.writer().close().await;
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        if tokio::time::timeout(EXIT_WAIT, child.wait()).await.is_err() {
            if let Some(pid) = child.id() {
                signal_group(&self.server, pid, nix::sys::signal::Signal::SIGTERM);
            }
            if tokio::time::timeout(EXIT_WAIT, child.wait()).await.is_err() {
                Box::into_pin(child.kill()).await?;
            }
        }
        self.child = None;
        Ok(())
    }
}

impl Drop for ChildTransport {
    fn drop(&mut self) {
        // Killed and reaped, so no zombie is left behind.
        if let Some(mut child) = self.child.take() {
            tokio::spawn(async move {
                if let Err(error) = Box::into_pin(child.kill()).await {
                    tracing::debug!(error = %error, "could not kill a child");
                }
            });
        }
    }
}

/// Each line the child writes to stderr becomes a log event under its server's name: stdout
/// is the protocol, so nothing of the child's may reach ours. A line is kept to
/// [`MAX_STDERR_LINE`] bytes (the rest is counted, not held: a child that writes without
/// newlines must not grow conductor's memory), and need not be UTF-8.
async fn forward_stderr(server: ServerName, stderr: ChildStderr, tail: StderrTail) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        match read_capped_line(&mut reader, &mut line, MAX_STDERR_LINE).await {
            Ok(Some(cut)) => {
                let mut text = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_owned();
                if cut > 0 {
                    text.push_str(&format!(" ... ({cut} more bytes not shown)"));
                }
                tail.push(&text);
                tracing::info!(server = %server, "{text}");
            }
            Ok(None) => break,
            Err(error) => {
                tracing::debug!(server = %server, error = %error, "stopped reading stderr");
                break;
            }
        }
    }
    tail.end();
}

/// The longest stderr line kept whole, in bytes.
const MAX_STDERR_LINE: usize = 16 * 1024;

/// Read one line into `line` (without its newline), keeping at most `max` bytes of it: the
/// count of bytes past those, or `None` at the end of the stream with nothing read.
async fn read_capped_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<usize>> {
    line.clear();
    let mut cut = 0;
    let mut read_any = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(read_any.then_some(cut));
        }
        read_any = true;
        let newline = memchr::memchr(b'\n', available);
        let part = &available[..newline.unwrap_or(available.len())];
        let keep = part.len().min(max.saturating_sub(line.len()));
        line.extend_from_slice(&part[..keep]);
        cut += part.len() - keep;
        let consumed = newline.map_or(available.len(), |at| at + 1);
        reader.consume(consumed);
        if newline.is_some() {
            return Ok(Some(cut));
        }
    }
}

/// Send `signal` to a child's whole process group (it leads it).
pub(super) fn signal_group(server: &ServerName, pid: u32, signal: nix::sys::signal::Signal) {
    let Ok(pid) = i32::try_from(pid) else {
        return;
    };
    if let Err(error) = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal) {
        tracing::debug!(server = %server, pid, error = %error, "could not signal {signal}");
    }
}

/// The program a spec names, as a path: a path is taken as it is, a bare name is looked up on
/// the `PATH` the child gets. `None` if there is no such file, so the error can say so rather
/// than a launcher failing later.
fn find_program(spec: &StdioSpec) -> Option<PathBuf> {
    let command = Path::new(&spec.command);
    if spec.command.contains('/') {
        let path = spec.cwd.join(command);
        return path.is_file().then_some(path);
    }
    let path = spec
        .env
        .iter()
        .rev()
        .find(|(key, _)| key == "PATH")
        .map(|(_, value)| OsString::from(value))
        .or_else(|| std::env::var_os("PATH"))?;
    std::env::split_paths(&path)
        .map(|folder| spec.cwd.join(folder).join(command))
        .find(|candidate| candidate.is_file())
}

/// The hidden first argument that makes `conductor` a child launcher.
pub const LAUNCHER_ARG: &str = "__launch-child";

static LAUNCHER: OnceLock<PathBuf> = OnceLock::new();

/// Start children through `executable` (conductor's own), which runs [`run_launcher`], so each
/// child gets a parent-death signal. Without it, children are started directly and are stopped
/// only by conductor's orderly shutdown and by their stdin closing.
pub fn use_launcher(executable: PathBuf) {
    let _ = LAUNCHER.set(executable);
}

/// `conductor __launch-child PARENT_PID PROGRAM ARGS...`: start PROGRAM as this process's
/// child and stay, as the leader of the process group conductor made for it, until it exits
/// (its exit status is this process's). When conductor dies, even by SIGKILL, the kernel
/// tells this process (a parent-death signal), which then kills the whole group: PROGRAM and
/// anything it started that stayed in the group, such as a grandchild that ignores SIGTERM.
///
/// The signals the group is sent to stop it (SIGTERM, SIGINT, SIGHUP) are for PROGRAM; this
/// process blocks them and waits, so conductor's last SIGKILL to the group still finds every
/// member. The standard library gives PROGRAM an empty signal mask. Linux ties the
/// parent-death signal to the thread that spawned this process: conductor spawns children
/// from its runtime's threads, which live as long as conductor does. Elsewhere (macOS) there
/// is no such signal: children stop when their stdin closes and at conductor's shutdown.
pub fn run_launcher(args: &[OsString]) -> ExitCode {
    use nix::sys::signal::{SigSet, Signal};
    let [parent, program, rest @ ..] = args else {
        eprintln!("usage: conductor {LAUNCHER_ARG} PARENT_PID PROGRAM [ARGS...]");
        return ExitCode::from(2);
    };
    let mut waited = SigSet::empty();
    for signal in [
        Signal::SIGCHLD,
        Signal::SIGUSR1,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        waited.add(signal);
    }
    if let Err(error) = waited.thread_block() {
        eprintln!("conductor: cannot block signals: {error}");
    }
    #[cfg(target_os = "linux")]
    if let Err(error) = nix::sys::prctl::set_pdeathsig(Signal::SIGUSR1) {
        eprintln!("conductor: cannot set a parent-death signal: {error}");
    }
    // The parent may have died before the signal was set: then nobody would send it.
    let expected = parent.to_str().and_then(|pid| pid.parse::<i32>().ok());
    if expected != Some(nix::unistd::getppid().as_raw()) {
        return ExitCode::FAILURE;
    }
    let mut child = match std::process::Command::new(program).args(rest).spawn() {
        Ok(child) => child,
        Err(error) => {
            eprintln!(
                "conductor: cannot start `{}`: {error}",
                program.to_string_lossy()
            );
            return ExitCode::from(127);
        }
    };
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                // Last on its stderr, so the reason a server failed shows how it ended.
                if !status.success() {
                    eprintln!("{}", how_it_ended(status));
                }
                return exit_code_of(status);
            }
            Ok(None) => {}
            Err(error) => {
                eprintln!("conductor: lost track of the server: {error}");
                return ExitCode::FAILURE;
            }
        }
        match waited.wait() {
            // Conductor is gone: nothing of this group may outlive it.
            Ok(Signal::SIGUSR1) => {
                let _ = nix::sys::signal::killpg(nix::unistd::getpgrp(), Signal::SIGKILL);
                return ExitCode::FAILURE;
            }
            // A child changed state (look again), or the group is being stopped (the server
            // was told too; its exit ends this loop).
            Ok(_) => {}
            Err(error) => {
                eprintln!("conductor: cannot wait for signals: {error}");
                let _ = child.wait();
                return ExitCode::FAILURE;
            }
        }
    }
}

/// How a server that failed ended, in words: its exit status, or the signal that ended it.
fn how_it_ended(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("(the server exited with status {code})"),
        (None, Some(signal)) => {
            let name = nix::sys::signal::Signal::try_from(signal)
                .map_or_else(|_| signal.to_string(), |signal| signal.as_str().to_owned());
            format!("(the server was ended by {name})")
        }
        (None, None) => "(the server ended)".to_owned(),
    }
}

/// The server's exit status as this process's: its code, or 128 + the signal that ended it,
/// as a shell says it.
fn exit_code_of(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_long_stderr_line_is_kept_short_and_counted() {
        let mut text = vec![b'x'; 100_000];
        text.extend_from_slice(b"\nnext\xff\nlast");
        let mut reader = tokio::io::BufReader::with_capacity(4096, text.as_slice());
        let mut line = Vec::new();
        let cut = read_capped_line(&mut reader, &mut line, 1000)
            .await
            .unwrap();
        assert_eq!((line.len(), cut), (1000, Some(99_000)));
        let cut = read_capped_line(&mut reader, &mut line, 1000)
            .await
            .unwrap();
        assert_eq!(
            (String::from_utf8_lossy(&line).as_ref(), cut),
            ("next\u{fffd}", Some(0))
        );
        let cut = read_capped_line(&mut reader, &mut line, 1000)
            .await
            .unwrap();
        assert_eq!((line.as_slice(), cut), (b"last".as_slice(), Some(0)));
        assert_eq!(
            read_capped_line(&mut reader, &mut line, 1000)
                .await
                .unwrap(),
            None
        );
    }
}
