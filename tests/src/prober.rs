//! Node proxy requests in a loop, the way a user keeps talking to kubelets through
//! kube-apiserver while the link changes under them.
//!
//! `GET /api/v1/nodes/NODE/proxy/healthz` through kube-apiserver (and so through the tunnel),
//! rotating over the nodes at a fixed pace, on a thread and runtime of its own (a test may
//! block on `kubectl`); a kube client straight to kube-apiserver, no process per request.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// One node proxy request: when it started, which node, how long it took, and its error.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// When the request was sent.
    pub at: Instant,
    /// The node it was for.
    pub node: String,
    /// How long it took to succeed or fail.
    pub took: Duration,
    /// Why it failed; `None` when the kubelet answered `ok`.
    pub error: Option<String>,
}

/// The running loop. Stopped, and its thread joined, when finished or dropped.
pub struct Prober {
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Prober {
    /// Starts a request every `interval` (a failed one included: the pace is the interval's
    /// either way), each given `timeout` to answer.
    pub fn start(
        kubeconfig: PathBuf,
        nodes: Vec<String>,
        interval: Duration,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!nodes.is_empty(), "no node to send requests to");
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (sink, stopped) = (Arc::clone(&outcomes), stop.clone());
        let thread = std::thread::spawn(move || {
            runtime
                .block_on(stopped.run_until_cancelled_owned(async move {
                    let client = crate::cluster::client_for(&kubeconfig).await?;
                    let mut tick = tokio::time::interval(interval);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    for node in nodes.iter().cycle() {
                        tick.tick().await;
                        let outcome = healthz(&client, node, timeout).await;
                        sink.lock().expect("outcomes").push(outcome);
                    }
                    anyhow::Ok(())
                }))
                .unwrap_or(Ok(()))
        });
        Ok(Prober {
            outcomes,
            stop,
            thread: Some(thread),
        })
    }

    /// Every outcome so far.
    pub fn outcomes(&self) -> Vec<Outcome> {
        self.outcomes.lock().expect("outcomes").clone()
    }

    /// How many requests succeeded so far.
    pub fn succeeded(&self) -> usize {
        self.outcomes
            .lock()
            .expect("outcomes")
            .iter()
            .filter(|o| o.error.is_none())
            .count()
    }

    /// Stops the loop; every outcome.
    pub fn finish(mut self) -> anyhow::Result<Vec<Outcome>> {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("prober panicked"))??;
        }
        Ok(self.outcomes())
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        // Cancelled, the thread's runtime returns at once.
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// kube-apiserver's node proxy to the kubelet's `/healthz`, through the tunnel.
async fn healthz(client: &kube::Client, node: &str, timeout: Duration) -> Outcome {
    let at = Instant::now();
    let request = http::Request::get(format!("/api/v1/nodes/{node}/proxy/healthz"))
        .body(Vec::new())
        .expect("a valid request");
    let error = match tokio::time::timeout(timeout, client.request_text(request)).await {
        Ok(Ok(body)) if body.trim() == "ok" => None,
        Ok(Ok(body)) => Some(format!("unexpected answer {body:?}")),
        Ok(Err(err)) => Some(err.to_string()),
        Err(_) => Some(format!("no answer within {timeout:?}")),
    };
    Outcome {
        at,
        node: node.to_owned(),
        took: at.elapsed(),
        error,
    }
}
