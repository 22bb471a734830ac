//! A network namespace of this process's own, held by one thread: sockets made there and
//! commands started there belong to it, whichever thread uses them afterwards.
//!
//! The namespace is the thread's (`unshare(CLONE_NEWNET)` on a thread of its own), not a
//! mounted file under `/run/netns`: it goes away with the last socket once the thread ends,
//! also when the process is killed, so there is nothing to clean up after a crash.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, mpsc};

use anyhow::Context as _;

/// Work run on the namespace's thread.
type Job = Box<dyn FnOnce() + Send>;

/// A handle on the namespace; clones share it, and the thread ends once every clone is gone.
#[derive(Clone)]
pub struct Netns(Arc<Inner>);

struct Inner {
    jobs: mpsc::Sender<Job>,
    tid: i32,
}

impl Netns {
    /// Makes a new, empty network namespace (only `lo`, down) on a thread of its own.
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let (jobs, incoming) = mpsc::channel::<Job>();
        let (started, tid) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let entered = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                    .map(|()| nix::unistd::gettid().as_raw())
                    .context("unshare(CLONE_NEWNET): making a network namespace needs root");
                let ok = entered.is_ok();
                let _ = started.send(entered);
                if ok {
                    // Until every handle is dropped.
                    while let Ok(job) = incoming.recv() {
                        job();
                    }
                }
            })?;
        let tid = tid
            .recv()
            .context("the namespace's thread ended before reporting")??;
        Ok(Netns(Arc::new(Inner { jobs, tid })))
    }

    /// The id of the thread holding the namespace: `ip link set ... netns <tid>` moves a link
    /// into it.
    pub fn tid(&self) -> i32 {
        self.0.tid
    }

    /// Runs `job` on the namespace's thread and returns its result.
    pub async fn run<T, F>(&self, job: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (done, result) = tokio::sync::oneshot::channel();
        self.0
            .jobs
            .send(Box::new(move || {
                let _ = done.send(job());
            }))
            .map_err(|_| anyhow::anyhow!("the namespace's thread is gone"))?;
        result.await.context("the namespace's thread dropped a job")
    }

    /// Runs `command` inside the namespace (a child process inherits the namespace of the
    /// thread that starts it); fails on a non-zero exit, with its standard error.
    pub async fn command(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut command = Command::new(program);
        command.args(args);
        let shown = format!("{command:?}");
        let output = self
            .run(move || command.output())
            .await?
            .with_context(|| format!("cannot run {shown}"))?;
        anyhow::ensure!(
            output.status.success(),
            "{shown} in the namespace: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Opens a TCP connection from inside the namespace.
    pub async fn connect(&self, address: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let socket = self
            .run(move || -> std::io::Result<std::net::TcpStream> {
                let domain = socket2::Domain::for_address(address);
                let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
                socket.set_nonblocking(true)?;
                Ok(socket.into())
            })
            .await
            .map_err(std::io::Error::other)??;
        tokio::net::TcpSocket::from_std_stream(socket)
            .connect(address)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root: skipped (passing) without it, as `cargo test` of the library runs anywhere.
    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[tokio::test]
    async fn sockets_made_in_the_namespace_do_not_reach_the_hosts_loopback() {
        if !root() {
            return;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let netns = Netns::create("netns-test").unwrap();
        netns
            .command("ip", &["link", "set", "lo", "up"])
            .await
            .unwrap();
        let links = netns.command("ip", &["-o", "link"]).await.unwrap();
        assert_eq!(links.lines().count(), 1, "only lo: {links}");
        let refused = netns.connect(address).await;
        assert!(
            refused.is_err(),
            "the host's listener answered inside: {refused:?}"
        );
        // The host's own sockets are unaffected.
        tokio::net::TcpStream::connect(address).await.unwrap();
    }
}
