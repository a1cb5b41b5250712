//! Starting a stdio downstream: its own process group, its stderr in our log.

use std::process::Stdio;

use process_wrap::tokio::{CommandWrap, KillOnDrop, ProcessGroup};
use rmcp::transport::TokioChildProcess;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::ChildStderr;

use super::ConnectError;
use crate::config::{ServerName, StdioSpec};

/// Spawn the child. It leads its own process group, so stopping it also stops whatever it
/// started (an `npx` wrapper's node process, a shell's children), and it is killed if the
/// handle is dropped.
pub(super) fn spawn(
    server: &ServerName,
    spec: &StdioSpec,
) -> Result<TokioChildProcess, ConnectError> {
    if !spec.cwd.is_dir() {
        return Err(ConnectError::Spawn {
            command: spec.command.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("its folder `{}` does not exist", spec.cwd.display()),
            ),
        });
    }
    let mut command = tokio::process::Command::new(&spec.command);
    command
        .args(&spec.args)
        .envs(spec.env.iter().map(|(key, value)| (key, value)))
        .current_dir(&spec.cwd);
    let mut wrapped = CommandWrap::from(command);
    wrapped.wrap(ProcessGroup::leader()).wrap(KillOnDrop);
    let (child, stderr) = TokioChildProcess::builder(wrapped)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ConnectError::Spawn {
            command: spec.command.clone(),
            source,
        })?;
    if let Some(stderr) = stderr {
        tokio::spawn(forward_stderr(server.clone(), stderr));
    }
    Ok(child)
}

/// Each line the child writes to stderr becomes a log event under its server's name: stdout
/// is the protocol, so nothing of the child's may reach ours.
async fn forward_stderr(server: ServerName, stderr: ChildStderr) {
    let mut lines = BufReader::new(stderr).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(line)) => tracing::info!(server = %server, "{line}"),
            Ok(None) => break,
            Err(error) => {
                tracing::debug!(server = %server, error = %error, "stopped reading stderr");
                break;
            }
        }
    }
}
