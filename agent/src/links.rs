//! The links the agent holds, per configured server address, and the readiness they make.
//!
//! A native server address gets one link. Behind a konnectivity address sit `servercount`
//! servers that a load balancer picks by chance: the agent holds one link to each distinct
//! server id it meets there and is ready once it holds as many as the servers say exist.

use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::metrics::gauge::Gauge;

use crate::LinkInfo;

/// The links up, per configured server address.
#[derive(Debug)]
pub(crate) struct Links {
    table: Mutex<Table>,
    links_up: Gauge,
    servers_known: Gauge,
}

#[derive(Debug)]
struct Table {
    next_id: u64,
    servers: Vec<ServerLinks>,
}

#[derive(Debug, Clone)]
struct ServerLinks {
    up: Vec<(u64, LinkInfo)>,
    /// Distinct servers to link to behind the address.
    wanted: u32,
}

/// A link whose server id is already linked behind the same address.
#[derive(Debug, thiserror::Error)]
#[error("already linked to server {0}")]
pub(crate) struct AlreadyLinked(pub(crate) String);

/// A link registered in [`Links`]; dropping it unregisters the link.
#[derive(Debug)]
pub(crate) struct HeldLink {
    links: Arc<Links>,
    server: usize,
    id: u64,
}

impl Drop for HeldLink {
    fn drop(&mut self) {
        let mut table = self.links.lock();
        table.servers[self.server]
            .up
            .retain(|(id, _)| *id != self.id);
        self.links.publish(&table);
    }
}

impl Links {
    /// Tracks `servers` addresses, each wanting one link until told otherwise. The gauges are
    /// kept equal to the links up and the servers the agent should be linked to.
    pub(crate) fn new(servers: usize, links_up: Gauge, servers_known: Gauge) -> Arc<Self> {
        let links = Links {
            table: Mutex::new(Table {
                next_id: 0,
                servers: vec![
                    ServerLinks {
                        up: Vec::new(),
                        wanted: 1,
                    };
                    servers
                ],
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
        let up: usize = table.servers.iter().map(|s| s.up.len()).sum();
        let known: u64 = table.servers.iter().map(|s| u64::from(s.wanted)).sum();
        self.links_up.set(i64::try_from(up).unwrap_or(i64::MAX));
        self.servers_known
            .set(i64::try_from(known).unwrap_or(i64::MAX));
    }

    /// Registers a link to `info.server_id` behind address `server`, unless one is already up.
    pub(crate) fn hold(
        self: &Arc<Self>,
        server: usize,
        info: LinkInfo,
    ) -> Result<HeldLink, AlreadyLinked> {
        let mut table = self.lock();
        if table.servers[server]
            .up
            .iter()
            .any(|(_, up)| up.server_id == info.server_id)
        {
            return Err(AlreadyLinked(info.server_id));
        }
        table.next_id += 1;
        let id = table.next_id;
        table.servers[server].up.push((id, info));
        self.publish(&table);
        Ok(HeldLink {
            links: self.clone(),
            server,
            id,
        })
    }

    /// Records how many distinct servers sit behind address `server`; at least one.
    pub(crate) fn set_wanted(&self, server: usize, count: u32) {
        let mut table = self.lock();
        table.servers[server].wanted = count.max(1);
        self.publish(&table);
    }

    /// Whether address `server` has fewer links up than servers behind it.
    pub(crate) fn short_of(&self, server: usize) -> bool {
        let table = self.lock();
        let links = &table.servers[server];
        links.up.len() < links.wanted as usize
    }

    /// Every link up, address by address.
    pub(crate) fn all(&self) -> Vec<LinkInfo> {
        self.lock()
            .servers
            .iter()
            .flat_map(|s| s.up.iter().map(|(_, info)| info.clone()))
            .collect()
    }

    /// `Ok` when every address has as many links as it wants; otherwise what is missing,
    /// naming each address with `names`.
    pub(crate) fn readiness<'a>(&self, names: impl Iterator<Item = &'a str>) -> Result<(), String> {
        let table = self.lock();
        let mut down = Vec::new();
        let mut short = Vec::new();
        for (links, name) in table.servers.iter().zip(names) {
            match (links.up.len(), links.wanted) {
                (0, _) => down.push(name),
                (up, wanted) if up < wanted as usize => {
                    short.push(format!("linked to {up} of {wanted} servers behind {name}"));
                }
                _ => {}
            }
        }
        let mut missing = short;
        if !down.is_empty() {
            missing.insert(0, format!("not linked to {}", down.join(", ")));
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

    fn links(servers: usize) -> (Arc<Links>, Gauge, Gauge) {
        let (up, known) = (Gauge::default(), Gauge::default());
        (Links::new(servers, up.clone(), known.clone()), up, known)
    }

    #[test]
    fn a_native_address_is_ready_with_one_link() {
        let (links, up, known) = links(2);
        assert_eq!(known.get(), 2);
        let names = || ["a:1", "b:1"].into_iter();
        assert_eq!(
            links.readiness(names()).unwrap_err(),
            "not linked to a:1, b:1"
        );
        let _a = links.hold(0, info("s1", 3)).unwrap();
        let b = links.hold(1, info("s1", 3)).unwrap();
        assert_eq!(up.get(), 2);
        assert!(links.readiness(names()).is_ok());
        drop(b);
        assert_eq!(up.get(), 1);
        assert_eq!(links.readiness(names()).unwrap_err(), "not linked to b:1");
    }

    #[test]
    fn a_konnectivity_address_wants_distinct_servers_up_to_the_count() {
        let (links, up, known) = links(1);
        let names = || std::iter::once("lb:8091");
        let first = links.hold(0, info("s1", 2)).unwrap();
        links.set_wanted(0, 2);
        assert_eq!(known.get(), 2);
        assert!(links.short_of(0));
        assert_eq!(
            links.readiness(names()).unwrap_err(),
            "linked to 1 of 2 servers behind lb:8091"
        );
        let err = links.hold(0, info("s1", 2)).unwrap_err();
        assert_eq!(err.0, "s1");
        assert_eq!(up.get(), 1, "a duplicate is not counted");
        let _second = links.hold(0, info("s2", 2)).unwrap();
        assert!(!links.short_of(0));
        assert!(links.readiness(names()).is_ok());
        drop(first);
        assert!(links.short_of(0));
        let ids: Vec<_> = links.all().into_iter().map(|l| l.server_id).collect();
        assert_eq!(ids, ["s2"]);
    }

    #[test]
    fn a_server_count_of_zero_still_wants_a_link() {
        let (links, _, known) = links(1);
        links.set_wanted(0, 0);
        assert_eq!(known.get(), 1);
        assert!(links.short_of(0));
    }
}
