//! The baseline: OpenSSH's reverse dynamic forward. `ssh -R 127.0.0.1:0` on the node side
//! makes sshd on the control-plane side listen as a SOCKS5 proxy, whose connections ssh dials
//! out from the node, the same shape as the tunnel's.
//!
//! Both run as child processes with a configuration of their own: sshd in inetd mode (`-i`) on
//! a connection this process accepted on `127.0.0.1:0`, keys made for the run, AES-256-GCM as
//! the cipher (what rustls picks first for TLS 1.3). `None` when OpenSSH is not installed
//! (`scripts/setup.sh` installs it).

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStderr, Command};

use cplink_e2e::procfs;

use crate::procs::{Cpu, Ends};

/// Where Debian installs sshd, which is not on an unprivileged user's PATH.
const SSHD: &str = "/usr/sbin/sshd";
/// How long sshd and ssh may take to set the forward up.
const SETUP: Duration = Duration::from_secs(30);

/// A linked sshd and ssh, and the SOCKS port of the forward.
pub struct OpenSsh {
    sshd: Child,
    ssh: Child,
    /// The SOCKS5 port sshd listens on for the forward.
    pub socks: SocketAddr,
    // Kept open so that a late message from ssh never meets a closed pipe.
    _messages: Lines<BufReader<ChildStderr>>,
    _dir: tempfile::TempDir,
}

impl OpenSsh {
    /// Starts sshd and ssh and waits until the forward listens; `None` without OpenSSH.
    pub async fn start() -> anyhow::Result<Option<Self>> {
        if !Path::new(SSHD).exists() || which("ssh").is_none() || which("ssh-keygen").is_none() {
            return Ok(None);
        }
        let dir = tempfile::tempdir()?;
        let key = |name: &str| -> anyhow::Result<PathBuf> {
            let path = dir.path().join(name);
            let made = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&path)
                .status()
                .context("cannot run ssh-keygen")?;
            anyhow::ensure!(made.success(), "ssh-keygen failed: {made}");
            Ok(path)
        };
        let host_key = key("host")?;
        let client_key = key("client")?;
        let authorized = dir.path().join("authorized_keys");
        std::fs::copy(client_key.with_extension("pub"), &authorized)?;
        let config = dir.path().join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "HostKey {}\nAuthorizedKeysFile {}\nStrictModes no\nUsePAM no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\nAllowTcpForwarding remote\n\
                 GatewayPorts no\nPidFile none\nLogLevel ERROR\n",
                host_key.display(),
                authorized.display()
            ),
        )?;
        // Run as root, sshd separates privileges into this directory, which its service would
        // have made.
        if nix::unistd::geteuid().is_root() {
            std::fs::create_dir_all("/run/sshd")?;
        }

        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let user = user()?;
        let mut ssh = Command::new("ssh")
            // A session with a terminal, as people use `ssh -R`: ssh then marks the connection
            // interactive and sets TCP_NODELAY on it, without which every small write waits
            // for Nagle's algorithm and a dial takes 40 ms.
            .args(["-tt", "-F", "/dev/null", "-i"])
            .arg(&client_key)
            .args([
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=accept-new",
                "-o",
            ])
            .arg(format!(
                "UserKnownHostsFile={}",
                dir.path().join("known_hosts").display()
            ))
            .args([
                "-o",
                "ExitOnForwardFailure=yes",
                "-o",
                "LogLevel=INFO",
                "-o",
                "Ciphers=aes256-gcm@openssh.com",
                "-o",
                "Compression=no",
                "-R",
                "127.0.0.1:0",
                "-p",
                &port.to_string(),
                &format!("{user}@127.0.0.1"),
                "exec sleep 2147483647",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start ssh")?;
        let (connection, _) = tokio::time::timeout(SETUP, listener.accept())
            .await
            .context("ssh did not connect")??;
        // sshd reads and writes its standard streams as blocking descriptors.
        let connection = connection.into_std()?;
        connection.set_nonblocking(false)?;
        let connection = OwnedFd::from(connection);
        let sshd = Command::new(SSHD)
            .args(["-i", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::from(connection.try_clone()?))
            .stdout(Stdio::from(connection))
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start sshd")?;

        let stderr = ssh.stderr.take().context("ssh's stderr is not piped")?;
        let mut messages = BufReader::new(stderr).lines();
        let allocated = tokio::time::timeout(SETUP, async {
            let mut said = Vec::new();
            while let Some(line) = messages.next_line().await? {
                if let Some(port) = line
                    .strip_prefix("Allocated port ")
                    .and_then(|rest| rest.split_whitespace().next())
                {
                    return Ok(port.parse::<u16>()?);
                }
                said.push(line);
            }
            anyhow::bail!(
                "ssh exited before the forward listened: {}",
                said.join("; ")
            )
        })
        .await
        .context("ssh did not report the forward's port")??;
        Ok(Some(OpenSsh {
            sshd,
            ssh,
            socks: SocketAddr::from(([127, 0, 0, 1], allocated)),
            _messages: messages,
            _dir: dir,
        }))
    }

    /// Stops ssh, which ends the session and with it sshd.
    pub async fn stop(mut self) {
        for child in [&mut self.ssh, &mut self.sshd] {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
    }

    fn pids(&self) -> anyhow::Result<(u32, u32)> {
        let sshd = self.sshd.id().context("sshd has exited")?;
        let ssh = self.ssh.id().context("ssh has exited")?;
        Ok((sshd, ssh))
    }
}

impl Ends for OpenSsh {
    /// sshd separates privileges into child processes: its CPU time and wake-ups are the
    /// whole tree's.
    fn cpu(&self) -> anyhow::Result<Cpu> {
        let (sshd, ssh) = self.pids()?;
        let mut server = Duration::ZERO;
        let mut server_wake_ups = 0;
        for pid in procfs::tree(sshd) {
            server += procfs::cpu(pid).unwrap_or_default();
            server_wake_ups += procfs::wake_ups(pid).unwrap_or_default();
        }
        Ok(Cpu {
            server,
            agent: procfs::cpu(ssh)?,
            server_wake_ups,
            agent_wake_ups: procfs::wake_ups(ssh)?,
        })
    }

    fn rss_kib(&self) -> anyhow::Result<(u64, u64)> {
        let (sshd, ssh) = self.pids()?;
        let server = procfs::tree(sshd)
            .into_iter()
            .map(|pid| procfs::rss_kib(pid).unwrap_or_default())
            .sum();
        Ok((server, procfs::rss_kib(ssh)?))
    }
}

/// The login name of this process's user, which ssh logs in as.
fn user() -> anyhow::Result<String> {
    let out = std::process::Command::new("id")
        .arg("-un")
        .output()
        .context("cannot run id")?;
    anyhow::ensure!(out.status.success(), "id -un failed: {}", out.status);
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// `program` on the PATH.
fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    })
}
