//! The tunneled connections open now, for `/debug/connections`: an entry per connection from
//! the start of its dial to its close, its bytes counted as they move.
//!
//! What a dial pays for it: one allocation (the entry), two uncontended lock sections (insert
//! and remove, in one of [`SHARDS`] maps picked by the connection's number, so concurrent dials
//! rarely meet) and two relaxed atomic additions per chunk moved (the connection's and its
//! link's count, next to the metric's). A dial already allocates its stream, its span and its
//! buffers and waits a round trip to the agent; this is noise beside that.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use cplink_proto::pump::{ByteCounters, CountBytes};
use cplink_proto::target::Target;

use crate::registry::AgentLink;

/// Maps the table is split into.
const SHARDS: usize = 16;

/// Every tunneled connection open on the server, by its number.
#[derive(Debug, Default)]
pub(crate) struct Connections {
    shards: [Mutex<BTreeMap<u64, Arc<Connection>>>; SHARDS],
    next_id: AtomicU64,
}

/// One tunneled connection.
#[derive(Debug)]
pub(crate) struct Connection {
    /// The server's number for it, in the order connections were opened.
    pub(crate) id: u64,
    /// `tls`, `uds` or `grpc`.
    pub(crate) frontend: &'static str,
    /// Where it goes.
    pub(crate) destination: Target,
    /// When its frontend asked for it.
    pub(crate) opened: Instant,
    /// The link carrying it: the one being dialed through, then the one that answered.
    link: Mutex<Option<Arc<AgentLink>>>,
    established: AtomicBool,
    to_agent: AtomicU64,
    from_agent: AtomicU64,
}

impl Connection {
    /// The link carrying it, once one was chosen.
    pub(crate) fn link(&self) -> Option<Arc<AgentLink>> {
        lock(&self.link).clone()
    }

    /// Records the link a dial attempt goes through.
    pub(crate) fn set_link(&self, link: &Arc<AgentLink>) {
        *lock(&self.link) = Some(link.clone());
    }

    /// Records that the agent's dial succeeded.
    pub(crate) fn set_established(&self) {
        self.established.store(true, Ordering::Relaxed);
    }

    /// Whether the agent's dial succeeded.
    pub(crate) fn is_established(&self) -> bool {
        self.established.load(Ordering::Relaxed)
    }

    /// Bytes so far: towards the agent, and from it.
    pub(crate) fn bytes(&self) -> (u64, u64) {
        (
            self.to_agent.load(Ordering::Relaxed),
            self.from_agent.load(Ordering::Relaxed),
        )
    }
}

/// An entry in [`Connections`], removed when dropped.
#[derive(Debug)]
pub(crate) struct Tracked {
    table: Arc<Connections>,
    entry: Arc<Connection>,
}

impl Tracked {
    /// The connection's entry.
    pub(crate) fn entry(&self) -> &Arc<Connection> {
        &self.entry
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        lock(self.table.shard(self.entry.id)).remove(&self.entry.id);
    }
}

impl Connections {
    /// Enters a connection to `destination` from `frontend`, dialing.
    pub(crate) fn track(self: &Arc<Self>, frontend: &'static str, destination: &Target) -> Tracked {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let entry = Arc::new(Connection {
            id,
            frontend,
            destination: destination.clone(),
            opened: Instant::now(),
            link: Mutex::new(None),
            established: AtomicBool::new(false),
            to_agent: AtomicU64::new(0),
            from_agent: AtomicU64::new(0),
        });
        lock(self.shard(id)).insert(id, entry.clone());
        Tracked {
            table: self.clone(),
            entry,
        }
    }

    /// The connections numbered after `after` that `keep` keeps, at most `count` of them, in
    /// order.
    pub(crate) fn after(
        &self,
        after: u64,
        count: usize,
        keep: impl Fn(&Connection) -> bool,
    ) -> Vec<Arc<Connection>> {
        let mut found: Vec<Arc<Connection>> = Vec::new();
        for shard in &self.shards {
            // Each shard's own first `count` are enough: no more than `count` are kept overall.
            found.extend(
                lock(shard)
                    .range(after.saturating_add(1)..)
                    .map(|(_, c)| c)
                    .filter(|c| keep(c))
                    .take(count)
                    .cloned(),
            );
        }
        found.sort_unstable_by_key(|c| c.id);
        found.truncate(count);
        found
    }

    /// How many connections are open.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    fn shard(&self, id: u64) -> &Mutex<BTreeMap<u64, Arc<Connection>>> {
        // The remainder is below SHARDS, which fits any usize.
        &self.shards[(id % SHARDS as u64) as usize]
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single map or field operation: a panic cannot leave one half
    // done.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts a tunneled connection's bytes in the server's metrics, in its entry and in its link,
/// as the pump moves them. The socket is the frontend's, the stream the agent's.
pub(crate) struct Counted<'a> {
    pub(crate) totals: &'a ByteCounters,
    pub(crate) connection: &'a Connection,
    pub(crate) link: &'a AgentLink,
}

impl CountBytes for Counted<'_> {
    fn to_stream(&self, n: u64) {
        self.totals.to_stream(n);
        self.connection.to_agent.fetch_add(n, Ordering::Relaxed);
        self.link.count_to_agent(n);
    }

    fn to_socket(&self, n: u64) {
        self.totals.to_socket(n);
        self.connection.from_agent.fetch_add(n, Ordering::Relaxed);
        self.link.count_from_agent(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(s: &str) -> Target {
        s.parse().unwrap()
    }

    #[test]
    fn entries_live_as_long_as_their_guard_and_list_in_order() {
        let table = Arc::new(Connections::default());
        let held: Vec<Tracked> = (0..40)
            .map(|i| table.track("tls", &target(&format!("node-{i}:10250"))))
            .collect();
        assert_eq!(table.len(), 40);
        let ids = |list: Vec<Arc<Connection>>| list.iter().map(|c| c.id).collect::<Vec<_>>();
        assert_eq!(ids(table.after(0, 3, |_| true)), [1, 2, 3]);
        assert_eq!(ids(table.after(17, 3, |_| true)), [18, 19, 20]);
        assert_eq!(ids(table.after(38, 5, |_| true)), [39, 40]);
        let odd = table.after(0, 100, |c| c.id % 2 == 1);
        assert_eq!(odd.len(), 20);
        assert!(odd.windows(2).all(|w| w[0].id < w[1].id));
        drop(held);
        assert_eq!(table.len(), 0);
        assert!(table.after(0, 10, |_| true).is_empty());
    }
}
