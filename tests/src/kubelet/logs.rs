//! Container logs as kubelet keeps them: every line a process writes to stdout or stderr, with
//! the time it was written, in one file per run of the container; the run before the current
//! one stays readable (`kubectl logs --previous`). Readers can take the last lines and follow
//! the file until the container stops.

use std::collections::HashMap;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::Context as _;
use bytes::Bytes;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::sync::watch;

/// Where a container's log is, by namespace, pod and container name.
type Key = (String, String, String);

/// The logs of every container the pod runner started.
#[derive(Default)]
pub struct Logs {
    containers: Mutex<HashMap<Key, Arc<ContainerLog>>>,
}

impl Logs {
    /// The log of a container, created in `dir` on first use.
    pub fn container(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        dir: &Path,
    ) -> Arc<ContainerLog> {
        let key = (namespace.to_owned(), pod.to_owned(), container.to_owned());
        let mut containers = self.containers.lock().expect("log table");
        Arc::clone(containers.entry(key).or_insert_with(|| {
            Arc::new(ContainerLog {
                dir: dir.to_owned(),
                state: watch::Sender::new(LogState::default()),
            })
        }))
    }

    /// The log of a container if it ever ran.
    pub fn find(&self, namespace: &str, pod: &str, container: &str) -> Option<Arc<ContainerLog>> {
        let key = (namespace.to_owned(), pod.to_owned(), container.to_owned());
        self.containers
            .lock()
            .expect("log table")
            .get(&key)
            .cloned()
    }

    /// Forgets every container of a pod (after it was deleted).
    pub fn forget_pod(&self, namespace: &str, pod: &str) {
        self.containers
            .lock()
            .expect("log table")
            .retain(|(ns, name, _), _| !(ns == namespace && name == pod));
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct LogState {
    /// How many runs the container has had; the current one writes `<run>.log`.
    runs: u32,
    /// Bytes in the current run's file.
    len: u64,
    /// Whether the current run's process may still write.
    open: bool,
}

/// One container's log files.
pub struct ContainerLog {
    dir: PathBuf,
    state: watch::Sender<LogState>,
}

/// What a reader asks for (the kubelet `containerLogs` query).
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOptions {
    /// Keep streaming until the container stops.
    pub follow: bool,
    /// Only the last lines.
    pub tail_lines: Option<usize>,
    /// Prefix each line with the RFC 3339 time it was written.
    pub timestamps: bool,
    /// The run before the current one.
    pub previous: bool,
}

impl ContainerLog {
    fn file(&self, run: u32) -> PathBuf {
        self.dir.join(format!("{run}.log"))
    }

    /// Starts capturing a new run of the container from its stdout and stderr; returns when
    /// both are closed (the process exited), then marks the run finished.
    pub async fn capture(
        self: Arc<Self>,
        stdout: impl AsyncRead + Unpin,
        stderr: impl AsyncRead + Unpin,
    ) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let mut run = 0;
        self.state.send_modify(|s| {
            s.runs += 1;
            s.len = 0;
            s.open = true;
            run = s.runs;
        });
        // Only the current run and the one before it are kept.
        if run > 2 {
            let _ = std::fs::remove_file(self.file(run - 2));
        }
        let file = Mutex::new(
            std::fs::File::create(self.file(run))
                .with_context(|| format!("cannot create {}", self.file(run).display()))?,
        );
        let (out, err) = tokio::join!(
            pump(stdout, &file, &self.state),
            pump(stderr, &file, &self.state)
        );
        self.state.send_modify(|s| s.open = false);
        out.and(err).context("cannot capture container output")
    }

    /// The log as a reader wants it: the first chunk now, later chunks from
    /// [`LogReader::next`] while following.
    pub fn read(&self, options: ReadOptions) -> anyhow::Result<LogReader> {
        let state = *self.state.borrow();
        let run = if options.previous {
            anyhow::ensure!(state.runs >= 2, "previous terminated container not found");
            state.runs - 1
        } else {
            anyhow::ensure!(state.runs >= 1, "container has not started yet");
            state.runs
        };
        let mut file = std::fs::File::open(self.file(run))?;
        let mut text = Vec::new();
        file.read_to_end(&mut text)?;
        // Only whole lines; a line being written is picked up by the next read.
        let whole = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        text.truncate(whole);
        let mut lines: Vec<&[u8]> = text.split_inclusive(|&b| b == b'\n').collect();
        if let Some(n) = options.tail_lines {
            lines.drain(..lines.len().saturating_sub(n));
        }
        let first = render(&lines, options.timestamps);
        let following = options.follow && !options.previous;
        Ok(LogReader {
            first: Some(first),
            file,
            offset: whole as u64,
            run,
            timestamps: options.timestamps,
            state: following.then(|| self.state.subscribe()),
        })
    }
}

/// Appends each line of `stream` to `file`, stamped with the time it was read.
async fn pump(
    stream: impl AsyncRead + Unpin,
    file: &Mutex<std::fs::File>,
    state: &watch::Sender<LogState>,
) -> std::io::Result<()> {
    let mut lines = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        if lines.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        let stamp = humantime::format_rfc3339_nanos(SystemTime::now()).to_string();
        let mut record = Vec::with_capacity(stamp.len() + 1 + line.len());
        record.extend_from_slice(stamp.as_bytes());
        record.push(b' ');
        record.extend_from_slice(&line);
        file.lock().expect("log file").write_all(&record)?;
        state.send_modify(|s| s.len += record.len() as u64);
    }
}

fn render(lines: &[&[u8]], timestamps: bool) -> Bytes {
    let mut out = Vec::new();
    for line in lines {
        if timestamps {
            out.extend_from_slice(line);
        } else {
            let at = line.iter().position(|&b| b == b' ').map_or(0, |i| i + 1);
            out.extend_from_slice(&line[at..]);
        }
    }
    Bytes::from(out)
}

/// A log being read, possibly followed.
pub struct LogReader {
    first: Option<Bytes>,
    file: std::fs::File,
    offset: u64,
    run: u32,
    timestamps: bool,
    state: Option<watch::Receiver<LogState>>,
}

impl LogReader {
    /// The next chunk of log; `None` at the end (not following, or the container stopped).
    pub async fn next(&mut self) -> Option<std::io::Result<Bytes>> {
        if let Some(first) = self.first.take()
            && (!first.is_empty() || self.state.is_none())
        {
            return Some(Ok(first));
        }
        let mut state = self.state.take()?;
        loop {
            let now = *state.borrow_and_update();
            let done = now.runs != self.run || !now.open;
            let len = if now.runs == self.run {
                now.len
            } else {
                u64::MAX
            };
            if len > self.offset {
                match self.read_more() {
                    Ok(chunk) if !chunk.is_empty() => {
                        self.state = Some(state);
                        return Some(Ok(chunk));
                    }
                    Ok(_) => {}
                    Err(err) => return Some(Err(err)),
                }
            }
            if done {
                // Whatever the run wrote last is already in the file.
                return match self.read_more() {
                    Ok(chunk) if chunk.is_empty() => None,
                    other => Some(other),
                };
            }
            if state.changed().await.is_err() {
                return None;
            }
        }
    }

    fn read_more(&mut self) -> std::io::Result<Bytes> {
        self.file.seek(SeekFrom::Start(self.offset))?;
        let mut text = Vec::new();
        self.file.read_to_end(&mut text)?;
        let whole = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        text.truncate(whole);
        self.offset += whole as u64;
        let lines: Vec<&[u8]> = text.split_inclusive(|&b| b == b'\n').collect();
        Ok(render(&lines, self.timestamps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    async fn collect(mut reader: LogReader) -> String {
        let mut out = Vec::new();
        while let Some(chunk) = reader.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn lines_of_both_streams_are_kept_and_tails_and_timestamps_apply() {
        let dir = tempfile::tempdir().unwrap();
        let logs = Logs::default();
        let log = logs.container("ns", "pod", "c", dir.path());
        log.clone()
            .capture(&b"one\ntwo\nthree"[..], &b"oops\n"[..])
            .await
            .unwrap();
        let all = collect(log.read(ReadOptions::default()).unwrap()).await;
        let mut lines: Vec<&str> = all.lines().collect();
        lines.sort_unstable();
        assert_eq!(lines, ["one", "oops", "three", "two"]);

        let tail = ReadOptions {
            tail_lines: Some(1),
            timestamps: true,
            ..ReadOptions::default()
        };
        let last = collect(log.read(tail).unwrap()).await;
        assert_eq!(last.lines().count(), 1);
        let (stamp, _) = last.split_once(' ').unwrap();
        humantime::parse_rfc3339(stamp).unwrap();
        assert!(logs.find("ns", "pod", "c").is_some());
        assert!(logs.find("ns", "pod", "other").is_none());
    }

    #[tokio::test]
    async fn following_streams_new_lines_until_the_process_stops() {
        let dir = tempfile::tempdir().unwrap();
        let log = Logs::default().container("ns", "pod", "c", dir.path());
        let (mut writer, stdout) = tokio::io::duplex(64);
        let capture = tokio::spawn(log.clone().capture(stdout, tokio::io::empty()));
        writer.write_all(b"first\n").await.unwrap();
        crate::wait::until("the first line", std::time::Duration::from_secs(10), || {
            log.state.borrow().len > 0
        })
        .await
        .unwrap();
        let mut reader = log
            .read(ReadOptions {
                follow: true,
                ..ReadOptions::default()
            })
            .unwrap();
        assert_eq!(&reader.next().await.unwrap().unwrap()[..], b"first\n");
        writer.write_all(b"second\n").await.unwrap();
        assert_eq!(&reader.next().await.unwrap().unwrap()[..], b"second\n");
        drop(writer);
        capture.await.unwrap().unwrap();
        assert!(
            reader.next().await.is_none(),
            "follow ends with the process"
        );
    }

    #[tokio::test]
    async fn the_previous_run_stays_readable_and_its_absence_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let log = Logs::default().container("ns", "pod", "c", dir.path());
        log.clone()
            .capture(&b"run one\n"[..], tokio::io::empty())
            .await
            .unwrap();
        let previous = ReadOptions {
            previous: true,
            ..ReadOptions::default()
        };
        let err = log.read(previous).err().unwrap().to_string();
        assert!(err.contains("previous terminated container"), "{err}");
        log.clone()
            .capture(&b"run two\n"[..], tokio::io::empty())
            .await
            .unwrap();
        assert_eq!(collect(log.read(previous).unwrap()).await, "run one\n");
        assert_eq!(
            collect(log.read(ReadOptions::default()).unwrap()).await,
            "run two\n"
        );
    }
}
