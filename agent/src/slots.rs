//! The links the agent holds, per server address, and the readiness they make.
//!
//! Each address the agent dials is a slot. A slot fed by discovery is one server (an endpoint
//! of the servers' Service) and wants one link. A sole fixed `--server-address` may front
//! several servers (a load balancer, a headless Service name) that a connection reaches by
//! chance: the slot wants as many distinct server ids as the servers report (`server_count`),
//! and the agent keeps dialing it until it holds them. Several fixed addresses are one server
//! each.
//!
//! A link reaching a server the slot already holds is a duplicate. Konnectivity servers keep
//! both links of an agent, so the new one is refused (closed). A cplink server replaces an
//! agent's previous link with the new one, so the new one is held and the old one is told to
//! drain ([`HeldLink::superseded`]).
//!
//! A slot that discovery no longer lists is retired: it no longer counts for readiness nor in
//! `servers_known`, but its links stay (and count in `links_up`) until their servers close them.
//!
//! Readiness gates a new agent until it has held every slot's links once; after that the agent
//! stays ready while any link is up. A server that drains and exits is still listed by its
//! Service until its pod is gone (the agent Service publishes not-ready servers), and a
//! DaemonSet's rolling update deletes every unready agent at once, without waiting: were each
//! lost link to make the agent unready, the end of one server's drain would restart every
//! agent together.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

use crate::LinkInfo;

/// Identifies a slot in [`Slots`].
pub(crate) type SlotId = u64;

/// How many distinct servers a slot wants links to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wants {
    /// One: the address is one server.
    One,
    /// As many as the servers behind the address report, at least one.
    ServerCount,
}

/// What to do with a link to a server the slot already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnDuplicate {
    /// Refuse the new link (the server keeps both until the agent closes one).
    Refuse,
    /// Hold the new link and supersede the old one (the server already replaced it).
    Replace,
}

/// Where the server addresses come from, as far as readiness is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// Fixed addresses, known from the start.
    Fixed,
    /// EndpointSlices of the Service named here (`namespace/name`), not listed yet.
    Discovering(String),
    /// EndpointSlices of the Service named here, listed at least once.
    Discovered(String),
}

/// The links up, per server address.
#[derive(Debug)]
pub(crate) struct Slots {
    table: Mutex<Table>,
    links_up: Gauge,
    servers_known: Gauge,
}

#[derive(Debug)]
struct Table {
    next_id: u64,
    source: Source,
    slots: BTreeMap<SlotId, Slot>,
}

#[derive(Debug)]
struct Slot {
    address: String,
    wants: Wants,
    /// The server count the servers last reported, at least one.
    server_count: u32,
    retired: bool,
    /// Whether the slot has held as many links as it wants at least once.
    complete: bool,
    /// Why the last attempt on this address failed, until a link comes up.
    last_error: Option<String>,
    up: Vec<Held>,
}

#[derive(Debug)]
struct Held {
    id: u64,
    info: LinkInfo,
    since: SystemTime,
    streams: Arc<AtomicUsize>,
    superseded: CancellationToken,
}

/// A slot as the debug view shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotView {
    pub(crate) id: SlotId,
    pub(crate) address: String,
    pub(crate) retired: bool,
    pub(crate) last_error: Option<String>,
    pub(crate) links: Vec<LinkView>,
}

/// A link up, as the debug view shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LinkView {
    pub(crate) id: u64,
    pub(crate) server_id: String,
    pub(crate) since: SystemTime,
    pub(crate) streams: usize,
}

impl Slot {
    fn wanted(&self) -> u32 {
        match self.wants {
            Wants::One => 1,
            Wants::ServerCount => self.server_count,
        }
    }
}

/// A link whose server id is already linked through the same address.
#[derive(Debug, thiserror::Error)]
#[error("already linked to server {0}")]
pub(crate) struct AlreadyLinked(pub(crate) String);

/// A link registered in [`Slots`]; dropping it unregisters the link.
#[derive(Debug)]
pub(crate) struct HeldLink {
    links: Arc<Slots>,
    slot: SlotId,
    id: u64,
    superseded: CancellationToken,
    replaced: bool,
    streams: Arc<AtomicUsize>,
}

/// Counts a tunneled connection on its link while it lives.
#[derive(Debug)]
pub(crate) struct StreamCount(Arc<AtomicUsize>);

impl Drop for StreamCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl HeldLink {
    /// Counts a tunneled connection on this link until the count is dropped.
    pub(crate) fn count_stream(&self) -> StreamCount {
        self.streams.fetch_add(1, Ordering::Relaxed);
        StreamCount(self.streams.clone())
    }

    /// Whether this link replaced an older link to the same server.
    pub(crate) fn replaced(&self) -> bool {
        self.replaced
    }

    /// Cancelled once a newer link to the same server replaced this one: it should drain.
    pub(crate) fn superseded(&self) -> &CancellationToken {
        &self.superseded
    }
}

impl Drop for HeldLink {
    fn drop(&mut self) {
        let mut table = self.links.lock();
        if let Some(slot) = table.slots.get_mut(&self.slot) {
            slot.up.retain(|held| held.id != self.id);
        }
        self.links.publish(&table);
    }
}

impl Slots {
    /// An empty table for addresses from `source`. The gauges are kept equal to the links up
    /// and the servers the agent should be linked to.
    pub(crate) fn new(source: Source, links_up: Gauge, servers_known: Gauge) -> Arc<Self> {
        let links = Slots {
            table: Mutex::new(Table {
                next_id: 0,
                source,
                slots: BTreeMap::new(),
            }),
            links_up,
            servers_known,
        };
        links.publish(&links.lock());
        Arc::new(links)
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Every critical section leaves the table consistent; a panic cannot leave one half done.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, table: &Table) {
        let up: usize = table.slots.values().map(|s| s.up.len()).sum();
        let known: u64 = table
            .slots
            .values()
            .filter(|s| !s.retired)
            .map(|s| u64::from(s.wanted()))
            .sum();
        self.links_up.set(i64::try_from(up).unwrap_or(i64::MAX));
        self.servers_known
            .set(i64::try_from(known).unwrap_or(i64::MAX));
    }

    /// Adds a slot for `address`.
    pub(crate) fn add(&self, address: String, wants: Wants) -> SlotId {
        let mut table = self.lock();
        table.next_id += 1;
        let id = table.next_id;
        table.slots.insert(
            id,
            Slot {
                address,
                wants,
                server_count: 1,
                retired: false,
                complete: false,
                last_error: None,
                up: Vec::new(),
            },
        );
        self.publish(&table);
        id
    }

    /// Stops counting `slot` for readiness and as a known server; its links stay.
    pub(crate) fn retire(&self, slot: SlotId) {
        let mut table = self.lock();
        if let Some(slot) = table.slots.get_mut(&slot) {
            slot.retired = true;
        }
        self.publish(&table);
    }

    /// Forgets `slot`, once nothing dials it and its links are gone.
    pub(crate) fn remove(&self, slot: SlotId) {
        let mut table = self.lock();
        table.slots.remove(&slot);
        self.publish(&table);
    }

    /// Records that discovery listed the server endpoints at least once.
    pub(crate) fn discovered(&self) {
        let mut table = self.lock();
        if let Source::Discovering(service) = &table.source {
            table.source = Source::Discovered(service.clone());
        }
    }

    /// Registers a link to `info.server_id` through `slot`. A link to a server the slot
    /// already holds is refused or replaces the old one, as `on_duplicate` says.
    pub(crate) fn hold(
        self: &Arc<Self>,
        slot: SlotId,
        info: LinkInfo,
        on_duplicate: OnDuplicate,
    ) -> Result<HeldLink, AlreadyLinked> {
        let mut table = self.lock();
        table.next_id += 1;
        let id = table.next_id;
        let Some(entry) = table.slots.get_mut(&slot) else {
            // Unreachable: a slot is removed only after every link of its task has ended.
            return Err(AlreadyLinked(info.server_id));
        };
        let duplicate = entry
            .up
            .iter()
            .position(|held| held.info.server_id == info.server_id);
        if let Some(at) = duplicate {
            match on_duplicate {
                OnDuplicate::Refuse => return Err(AlreadyLinked(info.server_id)),
                OnDuplicate::Replace => entry.up.remove(at).superseded.cancel(),
            }
        }
        let superseded = CancellationToken::new();
        let streams = Arc::new(AtomicUsize::new(0));
        entry.last_error = None;
        entry.up.push(Held {
            id,
            info,
            since: SystemTime::now(),
            streams: streams.clone(),
            superseded: superseded.clone(),
        });
        entry.complete |= entry.up.len() >= entry.wanted() as usize;
        self.publish(&table);
        Ok(HeldLink {
            links: self.clone(),
            slot,
            id,
            superseded,
            replaced: duplicate.is_some(),
            streams,
        })
    }

    /// Records why an attempt on `slot` failed, for the debug view.
    pub(crate) fn failed(&self, slot: SlotId, error: String) {
        if let Some(slot) = self.lock().slots.get_mut(&slot) {
            slot.last_error = Some(error);
        }
    }

    /// Every slot and its links up, in the order they were added.
    pub(crate) fn views(&self) -> Vec<SlotView> {
        self.lock()
            .slots
            .iter()
            .map(|(id, slot)| SlotView {
                id: *id,
                address: slot.address.clone(),
                retired: slot.retired,
                last_error: slot.last_error.clone(),
                links: slot
                    .up
                    .iter()
                    .map(|held| LinkView {
                        id: held.id,
                        server_id: held.info.server_id.clone(),
                        since: held.since,
                        streams: held.streams.load(Ordering::Relaxed),
                    })
                    .collect(),
            })
            .collect()
    }

    /// Records how many servers the servers behind `slot` report; at least one.
    pub(crate) fn set_server_count(&self, slot: SlotId, count: u32) {
        let mut table = self.lock();
        if let Some(slot) = table.slots.get_mut(&slot) {
            let more = count.max(1) > slot.server_count;
            slot.server_count = count.max(1);
            // More servers than the slot held at once: readiness waits for them as well.
            if more {
                slot.complete = slot.up.len() >= slot.wanted() as usize;
            }
        }
        self.publish(&table);
    }

    /// Whether `slot` has fewer links up than distinct servers it wants.
    pub(crate) fn short_of(&self, slot: SlotId) -> bool {
        self.lock()
            .slots
            .get(&slot)
            .is_some_and(|s| s.up.len() < s.wanted() as usize)
    }

    /// Every link up, slot by slot.
    pub(crate) fn all(&self) -> Vec<LinkInfo> {
        self.lock()
            .slots
            .values()
            .flat_map(|s| s.up.iter().map(|held| held.info.clone()))
            .collect()
    }

    /// The addresses the agent links to (retired ones aside), in the order they were added.
    pub(crate) fn addresses(&self) -> Vec<String> {
        self.lock()
            .slots
            .values()
            .filter(|s| !s.retired)
            .map(|s| s.address.clone())
            .collect()
    }

    /// `Ok` once every address has held as many links as it wants, and discovery found at
    /// least one, for as long as a link is up; otherwise what is missing.
    pub(crate) fn readiness(&self) -> Result<(), String> {
        let table = self.lock();
        let active = || table.slots.values().filter(|s| !s.retired);
        match &table.source {
            Source::Discovering(service) => {
                return Err(format!(
                    "no server endpoints known yet: the EndpointSlices of service {service} \
                     have not been listed"
                ));
            }
            Source::Discovered(service) if active().next().is_none() => {
                return Err(format!("service {service} has no server endpoints"));
            }
            _ => {}
        }
        let mut down = Vec::new();
        let mut short = Vec::new();
        for slot in active().filter(|slot| !slot.complete) {
            match (slot.up.len(), slot.wanted()) {
                (0, _) => down.push(slot.address.as_str()),
                (up, wanted) if up < wanted as usize => short.push(format!(
                    "linked to {up} of {wanted} servers behind {}",
                    slot.address
                )),
                _ => {}
            }
        }
        let mut missing = short;
        if !down.is_empty() {
            missing.insert(0, format!("not linked to {}", down.join(", ")));
        }
        if missing.is_empty() && !table.slots.values().any(|slot| !slot.up.is_empty()) {
            let all: Vec<&str> = active().map(|slot| slot.address.as_str()).collect();
            missing.push(format!("no link up: not linked to {}", all.join(", ")));
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, count: u32) -> LinkInfo {
        LinkInfo {
            server_id: id.into(),
            server_count: count,
        }
    }

    fn links(source: Source) -> (Arc<Slots>, Gauge, Gauge) {
        let (up, known) = (Gauge::default(), Gauge::default());
        (Slots::new(source, up.clone(), known.clone()), up, known)
    }

    #[test]
    fn an_address_that_is_one_server_is_ready_with_one_link() {
        let (links, up, known) = links(Source::Fixed);
        let a = links.add("a:1".into(), Wants::One);
        let b = links.add("b:1".into(), Wants::One);
        assert_eq!(known.get(), 2);
        assert_eq!(links.readiness().unwrap_err(), "not linked to a:1, b:1");
        let held_a = links.hold(a, info("s1", 3), OnDuplicate::Refuse).unwrap();
        links.set_server_count(b, 3);
        assert_eq!(
            known.get(),
            2,
            "the server count does not apply to one server"
        );
        let held_b = links.hold(b, info("s2", 3), OnDuplicate::Refuse).unwrap();
        assert_eq!(up.get(), 2);
        assert!(links.readiness().is_ok());
        assert!(!links.short_of(b));
        drop(held_b);
        assert_eq!(up.get(), 1);
        assert!(
            links.readiness().is_ok(),
            "a server lost after linking leaves the agent ready while another link is up"
        );
        drop(held_a);
        assert_eq!(
            links.readiness().unwrap_err(),
            "no link up: not linked to a:1, b:1"
        );
        let _b = links.hold(b, info("s2", 3), OnDuplicate::Refuse).unwrap();
        assert!(links.readiness().is_ok());
    }

    #[test]
    fn a_server_that_drains_away_while_still_listed_leaves_the_agent_ready() {
        let (links, _, _) = links(Source::Discovering("ns/svc".into()));
        links.discovered();
        let old = links.add("10.0.0.1:8091".into(), Wants::One);
        let new = links.add("10.0.0.2:8091".into(), Wants::One);
        let held_old = links
            .hold(old, info("s1", 2), OnDuplicate::Replace)
            .unwrap();
        let _held_new = links
            .hold(new, info("s2", 2), OnDuplicate::Replace)
            .unwrap();
        assert!(links.readiness().is_ok());
        // The old server finished draining and exited; its pod is still in the slices.
        drop(held_old);
        assert!(links.readiness().is_ok());
        // A server listed later gates readiness until the agent has linked to it once.
        let later = links.add("10.0.0.3:8091".into(), Wants::One);
        assert_eq!(
            links.readiness().unwrap_err(),
            "not linked to 10.0.0.3:8091"
        );
        let _held_later = links
            .hold(later, info("s3", 3), OnDuplicate::Replace)
            .unwrap();
        assert!(links.readiness().is_ok());
    }

    #[test]
    fn a_balanced_address_wants_distinct_servers_up_to_the_count() {
        let (links, up, known) = links(Source::Fixed);
        let lb = links.add("lb:8091".into(), Wants::ServerCount);
        let first = links.hold(lb, info("s1", 2), OnDuplicate::Refuse).unwrap();
        links.set_server_count(lb, 2);
        assert_eq!(known.get(), 2);
        assert!(links.short_of(lb));
        assert_eq!(
            links.readiness().unwrap_err(),
            "linked to 1 of 2 servers behind lb:8091"
        );
        let err = links
            .hold(lb, info("s1", 2), OnDuplicate::Refuse)
            .unwrap_err();
        assert_eq!(err.0, "s1");
        assert_eq!(up.get(), 1, "a duplicate is not counted");
        let _second = links.hold(lb, info("s2", 2), OnDuplicate::Refuse).unwrap();
        assert!(!links.short_of(lb));
        assert!(links.readiness().is_ok());
        drop(first);
        assert!(links.short_of(lb));
        let ids: Vec<_> = links.all().into_iter().map(|l| l.server_id).collect();
        assert_eq!(ids, ["s2"]);
    }

    #[test]
    fn a_replacing_duplicate_supersedes_the_old_link() {
        let (links, up, _) = links(Source::Fixed);
        let lb = links.add("lb:8091".into(), Wants::ServerCount);
        links.set_server_count(lb, 2);
        let old = links.hold(lb, info("s1", 2), OnDuplicate::Replace).unwrap();
        let new = links.hold(lb, info("s1", 2), OnDuplicate::Replace).unwrap();
        assert!(old.superseded().is_cancelled());
        assert!(!new.superseded().is_cancelled());
        assert!(!old.replaced() && new.replaced());
        assert_eq!(up.get(), 1, "one server, one link counted");
        assert!(links.short_of(lb), "still one distinct server of two");
        drop(old);
        assert_eq!(
            up.get(),
            1,
            "the old link's end does not unregister the new one"
        );
        assert_eq!(links.all(), [info("s1", 2)]);
        drop(new);
        assert_eq!(up.get(), 0);
    }

    #[test]
    fn a_server_count_of_zero_still_wants_a_link() {
        let (links, _, known) = links(Source::Fixed);
        let lb = links.add("lb:8091".into(), Wants::ServerCount);
        links.set_server_count(lb, 0);
        assert_eq!(known.get(), 1);
        assert!(links.short_of(lb));
    }

    #[test]
    fn discovery_is_ready_once_linked_to_every_listed_endpoint() {
        let (links, up, known) = links(Source::Discovering("ns/svc".into()));
        let err = links.readiness().unwrap_err();
        assert!(err.contains("ns/svc have not been listed"), "{err}");
        links.discovered();
        assert_eq!(
            links.readiness().unwrap_err(),
            "service ns/svc has no server endpoints"
        );

        let a = links.add("10.0.0.1:8091".into(), Wants::One);
        let b = links.add("10.0.0.2:8091".into(), Wants::One);
        assert_eq!(known.get(), 2);
        let _a = links.hold(a, info("s1", 2), OnDuplicate::Replace).unwrap();
        assert_eq!(
            links.readiness().unwrap_err(),
            "not linked to 10.0.0.2:8091"
        );
        let held_b = links.hold(b, info("s2", 2), OnDuplicate::Replace).unwrap();
        assert!(links.readiness().is_ok());

        // b leaves the slices: no longer wanted, but its link stays until its server closes it.
        links.retire(b);
        assert_eq!(known.get(), 1);
        assert_eq!(up.get(), 2);
        assert!(links.readiness().is_ok());
        assert_eq!(links.addresses(), ["10.0.0.1:8091"]);
        assert_eq!(links.all().len(), 2);
        drop(held_b);
        links.remove(b);
        assert_eq!(up.get(), 1);

        links.retire(a);
        assert_eq!(
            links.readiness().unwrap_err(),
            "service ns/svc has no server endpoints"
        );
    }
}
