//! A pseudo-terminal for a child process. Some programs act differently on a terminal:
//! `kubectl exec -t` asks for a remote terminal only when its own standard input is one. The
//! child gets the pty's follower side as standard input, output and error; the test types on
//! the controller side and reads what the program shows there.

use std::io::{Read as _, Write as _};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;

/// A child process on a pseudo-terminal of its own; killed when dropped.
pub struct Terminal {
    child: Child,
    keyboard: std::fs::File,
    screen: Arc<Mutex<Vec<u8>>>,
}

impl Terminal {
    /// Starts `command` on a new 80x24 pseudo-terminal.
    pub fn spawn(mut command: Command) -> anyhow::Result<Self> {
        let size = nix::pty::Winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&size), None).context("cannot open a pseudo-terminal")?;
        command
            .stdin(Stdio::from(pty.slave.try_clone()?))
            .stdout(Stdio::from(pty.slave.try_clone()?))
            .stderr(Stdio::from(pty.slave));
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {command:?}"))?;
        // The command holds the follower's descriptors until dropped: once only the child
        // holds them, reading the controller ends when the child is gone.
        drop(command);
        let keyboard = std::fs::File::from(pty.master);
        let mut display = keyboard.try_clone()?;
        let screen = Arc::new(Mutex::new(Vec::new()));
        let shown = Arc::clone(&screen);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Linux answers EIO once the follower side is closed.
            while let Ok(n @ 1..) = display.read(&mut buf) {
                shown.lock().expect("screen").extend_from_slice(&buf[..n]);
            }
        });
        Ok(Terminal {
            child,
            keyboard,
            screen,
        })
    }

    /// Types `line` and Enter.
    pub fn type_line(&mut self, line: &str) -> anyhow::Result<()> {
        self.keyboard.write_all(format!("{line}\r").as_bytes())?;
        Ok(self.keyboard.flush()?)
    }

    /// Everything shown so far, lossily decoded.
    pub fn screen(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().expect("screen")).into_owned()
    }

    /// Waits until the screen shows `text`, for at most `deadline`; fails with the screen.
    pub async fn wait_for(&self, text: &str, deadline: Duration) -> anyhow::Result<()> {
        crate::wait::until(&format!("the terminal to show {text:?}"), deadline, || {
            self.screen().contains(text)
        })
        .await
        .with_context(|| format!("the screen: {:?}", self.screen()))
    }

    /// Waits for the program to exit, for at most `within`; `None` if it still runs.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        crate::harness::wait_child(&mut self.child, within)
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        crate::harness::stop_child(&mut self.child, Duration::ZERO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_child_sees_a_terminal_and_reads_what_is_typed() {
        let mut command = Command::new("sh");
        command.args([
            "-c",
            "test -t 0 && test -t 1 && echo on-a-tty; read line; echo \"got:$line\"",
        ]);
        let mut terminal = Terminal::spawn(command).unwrap();
        terminal
            .wait_for("on-a-tty", Duration::from_secs(10))
            .await
            .unwrap();
        terminal.type_line("typed").unwrap();
        terminal
            .wait_for("got:typed", Duration::from_secs(10))
            .await
            .unwrap();
        let status = terminal.wait_exit(Duration::from_secs(10)).expect("exits");
        assert!(status.success(), "{status}");
    }
}
