//! The status a link reports, and the Events its changes of state deserve.
//!
//! Pure: the reconciler gathers what it observed into [`Observed`], this module turns it into
//! conditions (keeping `lastTransitionTime` while a condition's status holds) and compares the
//! old and new status to decide which Events to publish, so a steady link publishes none.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{
    AgentsStatus, CertificatesStatus, ControlPlaneLinkStatus, EgressCertificateStatus,
    FrontendStatus, ServerStatus,
};
use crate::resources::secrets::EGRESS_DIR;
use crate::validate::InvalidSpec;

/// Condition: the link carries traffic (all of the below are true).
pub const READY: &str = "Ready";
/// Condition: at least one server replica is ready.
pub const SERVER_AVAILABLE: &str = "ServerAvailable";
/// Condition: every scheduled agent is ready (linked to all servers), or agents run outside the
/// cluster, where the operator has none to count.
pub const AGENTS_AVAILABLE: &str = "AgentsAvailable";
/// Condition: the CA and all certificates are valid.
pub const CERTIFICATES_READY: &str = "CertificatesReady";
/// Condition, a warning outside `Ready`: the operator replaced kube-apiserver's egress client
/// certificate, and a kube-apiserver that has not restarted since (it reads the file only when
/// it starts) presents the old one, which expires at the time the message names.
pub const EGRESS_CERTIFICATE_EXPIRING: &str = "EgressCertificateExpiring";

/// Reason of `Ready=False` until the link has been ready once.
pub const REASON_PROGRESSING: &str = "Progressing";
/// Reason of `Ready=False` for a spec the operator cannot act on.
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
/// Reason of `AgentsAvailable=True` when agents run outside the cluster, uncounted.
pub const REASON_OUTSIDE_CLUSTER: &str = "OutsideCluster";

/// State of the certificates as the reconciler found or made them.
#[derive(Debug, Clone, PartialEq)]
pub enum Certificates {
    /// All certificates valid; the earliest expiry.
    Ready {
        /// Earliest `notAfter` of CA and leaves.
        not_after: Time,
        /// kube-apiserver's client certificate; `None` in `GRPC` mode, where kube-apiserver
        /// presents none.
        egress: Option<EgressCertificate>,
    },
    /// The CA could not be used; nothing was issued.
    NotReady {
        /// CamelCase reason, e.g. `CASecretNotFound`.
        reason: &'static str,
        /// Human readable detail.
        message: String,
    },
}

/// kube-apiserver's egress client certificate, as the reconciler found or made it.
#[derive(Debug, Clone, PartialEq)]
pub struct EgressCertificate {
    /// Name of the egress Secret.
    pub secret: String,
    /// `notAfter` of the certificate in the Secret.
    pub not_after: Time,
    /// `notAfter` of the certificate this reconcile replaced in the Secret, unless it had
    /// expired.
    pub replaced: Option<Time>,
}

/// What the operator knows of the agents.
#[derive(Debug, Clone, PartialEq)]
pub enum Agents {
    /// The agent DaemonSet the operator runs (`agent.authentication: token`); `None` until it
    /// was applied.
    DaemonSet(Option<AgentsStatus>),
    /// Agents run outside the cluster (`agent.authentication: certificate`): nothing says how
    /// many there should be; the servers' linked agents are all there is to count.
    OutsideCluster,
}

/// What one reconcile observed.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// Generation of the link that was reconciled.
    pub generation: Option<i64>,
    /// Server replicas, from the applied Deployment.
    pub server: Option<ServerStatus>,
    /// Agents.
    pub agents: Agents,
    /// Frontend address and egress Secret.
    pub frontend: Option<FrontendStatus>,
    /// Certificates.
    pub certificates: Certificates,
}

/// Desired and ready replicas of the server Deployment.
pub fn server_status(deploy: &Deployment) -> ServerStatus {
    let replicas = deploy.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let ready_replicas = deploy
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    ServerStatus {
        replicas,
        ready_replicas,
        summary: format!("{ready_replicas}/{replicas}"),
        linked_agents: Vec::new(),
    }
}

/// Desired and ready agents of the DaemonSet.
pub fn agents_status(ds: &DaemonSet) -> AgentsStatus {
    let (desired, ready) = ds
        .status
        .as_ref()
        .map_or((0, 0), |s| (s.desired_number_scheduled, s.number_ready));
    AgentsStatus {
        desired,
        ready,
        summary: format!("{ready}/{desired}"),
    }
}

/// Whether every listed server pod reported every desired agent linked (or none is listed,
/// when nothing more can be learned by asking again). Agents outside the cluster have no
/// desired count; since each links to every server, they are settled once every server
/// reports the same count.
pub fn links_settled(server: &ServerStatus, agents: &Agents) -> bool {
    let mut counts = server.linked_agents.iter().map(|l| l.agents);
    let expected = match agents {
        Agents::DaemonSet(status) => Some(i64::from(status.as_ref().map_or(0, |a| a.desired))),
        Agents::OutsideCluster => match counts.next() {
            None => return true,
            Some(first) => first,
        },
    };
    expected.is_some() && counts.all(|count| count == expected)
}

fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Builds a condition, keeping the old transition time while its status is unchanged.
fn condition(
    old: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = find(old, type_)
        .filter(|c| c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// Whether a condition of `conditions` is True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

/// The status of a link after a successful apply.
pub fn desired_status(
    old: Option<&ControlPlaneLinkStatus>,
    observed: &Observed,
    now: &Time,
) -> ControlPlaneLinkStatus {
    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let generation = observed.generation;
    let cond = |type_, ok, reason, message| {
        condition(old_conditions, type_, ok, reason, message, generation, now)
    };

    let certificates = match &observed.certificates {
        Certificates::Ready { not_after, .. } => cond(
            CERTIFICATES_READY,
            true,
            "Issued",
            format!("certificates valid until {}", not_after.0),
        ),
        Certificates::NotReady { reason, message } => {
            cond(CERTIFICATES_READY, false, reason, message.clone())
        }
    };
    let server = match &observed.server {
        Some(s) if s.ready_replicas > 0 => cond(
            SERVER_AVAILABLE,
            true,
            "ReplicasReady",
            format!("{} server replicas ready", s.summary),
        ),
        Some(s) => cond(
            SERVER_AVAILABLE,
            false,
            "NoReplicasReady",
            format!("{} server replicas ready", s.summary),
        ),
        None => cond(
            SERVER_AVAILABLE,
            false,
            "NotCreated",
            "server Deployment not created".into(),
        ),
    };
    let agents = match &observed.agents {
        Agents::OutsideCluster => cond(
            AGENTS_AVAILABLE,
            true,
            REASON_OUTSIDE_CLUSTER,
            "agents run outside the cluster (spec.agent.authentication is certificate); \
             status.server.linkedAgents counts those linked to each server"
                .into(),
        ),
        Agents::DaemonSet(Some(a)) if a.desired == 0 => cond(
            AGENTS_AVAILABLE,
            false,
            "NoAgentsScheduled",
            "no node runs an agent".into(),
        ),
        Agents::DaemonSet(Some(a)) if a.ready == a.desired => cond(
            AGENTS_AVAILABLE,
            true,
            "AllAgentsReady",
            format!("{} agents ready", a.summary),
        ),
        Agents::DaemonSet(Some(a)) => cond(
            AGENTS_AVAILABLE,
            false,
            "AgentsNotReady",
            format!("{} agents ready", a.summary),
        ),
        Agents::DaemonSet(None) => cond(
            AGENTS_AVAILABLE,
            false,
            "NotCreated",
            "agent DaemonSet not created".into(),
        ),
    };

    let failing = [
        (&certificates, "CertificatesNotReady"),
        (&server, "ServerUnavailable"),
        (&agents, "AgentsUnavailable"),
    ]
    .into_iter()
    .find(|(c, _)| c.status != "True");
    let ready = match failing {
        None => cond(READY, true, "Available", ready_message(observed)),
        Some((c, reason)) => {
            // Until the link has been ready once, it is still coming up rather than broken.
            let progressing = find(old_conditions, READY).is_none_or(|r| {
                r.status != "True"
                    && (r.reason == REASON_PROGRESSING || r.reason == REASON_INVALID_SPEC)
            });
            let reason = if progressing {
                REASON_PROGRESSING
            } else {
                reason
            };
            cond(READY, false, reason, c.message.clone())
        }
    };

    let old_egress = old
        .and_then(|s| s.certificates.as_ref())
        .and_then(|c| c.egress.as_ref());
    let (certificates_status, egress) = match &observed.certificates {
        Certificates::Ready {
            not_after,
            egress: Some(egress),
        } => {
            let status = egress_status(old_egress, egress, now);
            let (ok, reason, message) = egress_condition(&status, egress, now);
            (
                Some(CertificatesStatus {
                    not_after: Some(not_after.clone()),
                    egress: Some(status),
                }),
                Some(cond(EGRESS_CERTIFICATE_EXPIRING, ok, reason, message)),
            )
        }
        Certificates::Ready {
            not_after,
            egress: None,
        } => (
            Some(CertificatesStatus {
                not_after: Some(not_after.clone()),
                egress: None,
            }),
            Some(cond(
                EGRESS_CERTIFICATE_EXPIRING,
                false,
                "NotUsed",
                "in GRPC mode kube-apiserver reaches the servers through their Unix socket and \
                 presents no client certificate"
                    .into(),
            )),
        ),
        // Nothing was issued: what was known of the certificates still holds.
        Certificates::NotReady { .. } => (
            old.and_then(|s| s.certificates.clone()),
            find(old_conditions, EGRESS_CERTIFICATE_EXPIRING).cloned(),
        ),
    };

    let mut conditions = vec![ready, server, agents, certificates];
    conditions.extend(egress);
    ControlPlaneLinkStatus {
        observed_generation: generation,
        conditions,
        server: observed.server.clone(),
        agents: match &observed.agents {
            Agents::DaemonSet(agents) => agents.clone(),
            Agents::OutsideCluster => None,
        },
        frontend: observed.frontend.clone(),
        certificates: certificates_status,
    }
}

/// The egress certificate's status: the one in the Secret, and the replaced one a
/// kube-apiserver may still present. A replaced certificate is remembered until it expires,
/// the earliest of several, since a kube-apiserver started before the first replacement holds
/// that one; once it has expired, the next replacement takes its place.
fn egress_status(
    old: Option<&EgressCertificateStatus>,
    egress: &EgressCertificate,
    now: &Time,
) -> EgressCertificateStatus {
    let pending = old.filter(|o| o.replaced_not_after.as_ref().is_some_and(|t| t.0 > now.0));
    let (replaced_at, replaced_not_after) = match (pending, &egress.replaced) {
        (Some(o), Some(expiry))
            if o.replaced_not_after
                .as_ref()
                .is_some_and(|t| expiry.0 < t.0) =>
        {
            (Some(now.clone()), Some(expiry.clone()))
        }
        (Some(o), _) => (o.replaced_at.clone(), o.replaced_not_after.clone()),
        (None, Some(expiry)) => (Some(now.clone()), Some(expiry.clone())),
        (None, None) => old.map_or((None, None), |o| {
            (o.replaced_at.clone(), o.replaced_not_after.clone())
        }),
    };
    EgressCertificateStatus {
        not_after: Some(egress.not_after.clone()),
        replaced_at,
        replaced_not_after,
    }
}

/// `EgressCertificateExpiring`: True from the replacement of kube-apiserver's client
/// certificate until the replaced one expires. The operator cannot see which certificate
/// kube-apiserver loaded, so it warns for as long as a kube-apiserver started before the
/// replacement would still be working, and says by when to restart it.
fn egress_condition(
    status: &EgressCertificateStatus,
    egress: &EgressCertificate,
    now: &Time,
) -> (bool, &'static str, String) {
    let secret = &egress.secret;
    match (&status.replaced_at, &status.replaced_not_after) {
        (Some(at), Some(expiry)) if expiry.0 > now.0 => (
            true,
            "KubeAPIServerRestartNeeded",
            format!(
                "kube-apiserver reads its egress client certificate only when it starts; Secret \
                 {secret} holds a new one since {at} and a kube-apiserver started before then \
                 presents one that expires at {expiry}: copy the Secret's ca.crt, tls.crt and \
                 tls.key to {EGRESS_DIR} on every control-plane host and restart kube-apiserver \
                 before {expiry}",
                at = at.0,
                expiry = expiry.0,
            ),
        ),
        (Some(at), Some(expiry)) => (
            false,
            "ReplacedCertificateExpired",
            format!(
                "the egress client certificate replaced at {} expired at {}: a kube-apiserver \
                 not restarted since then is refused by the servers; Secret {secret} holds one \
                 valid until {}",
                at.0, expiry.0, egress.not_after.0
            ),
        ),
        _ => (
            false,
            "Current",
            format!(
                "Secret {secret} holds kube-apiserver's egress client certificate, valid until \
                 {}; kube-apiserver reads it only when it starts",
                egress.not_after.0
            ),
        ),
    }
}

/// The message of `Ready=True`.
fn ready_message(observed: &Observed) -> String {
    let servers = observed.server.as_ref().map_or("0/0", |s| &s.summary);
    match &observed.agents {
        Agents::DaemonSet(agents) => format!(
            "{servers} servers and {} agents ready",
            agents.as_ref().map_or("0/0", |a| &a.summary)
        ),
        Agents::OutsideCluster => {
            format!("{servers} servers ready; agents run outside the cluster")
        }
    }
}

/// The status of a link whose spec is invalid: `Ready=False`/`InvalidSpec` naming the field;
/// the rest of the old status stays as it was, since no child was touched.
pub fn invalid_status(
    old: Option<&ControlPlaneLinkStatus>,
    invalid: &InvalidSpec,
    generation: Option<i64>,
    now: &Time,
) -> ControlPlaneLinkStatus {
    let mut status = old.cloned().unwrap_or_default();
    let ready = condition(
        &status.conditions,
        READY,
        false,
        REASON_INVALID_SPEC,
        invalid.to_string(),
        generation,
        now,
    );
    status.conditions.retain(|c| c.type_ != READY);
    status.conditions.insert(0, ready);
    status.observed_generation = generation;
    status
}

/// An Event to publish about the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Whether it is a warning.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// Human readable note.
    pub note: String,
}

impl Transition {
    /// An Event of type Normal.
    pub fn normal(reason: &'static str, note: String) -> Self {
        Self {
            warning: false,
            reason,
            note,
        }
    }
    /// An Event of type Warning.
    pub fn warning(reason: &'static str, note: String) -> Self {
        Self {
            warning: true,
            reason,
            note,
        }
    }
}

/// The Events the change from `old` to `new` deserves: none when nothing changed state.
pub fn transitions(
    old: Option<&ControlPlaneLinkStatus>,
    new: &ControlPlaneLinkStatus,
    certificates_renewed: bool,
) -> Vec<Transition> {
    let mut events = Vec::new();
    let new_ready = find(&new.conditions, READY);
    let old_ready = old.and_then(|s| find(&s.conditions, READY));
    let invalid = new_ready.is_some_and(|r| r.reason == REASON_INVALID_SPEC);

    if invalid {
        if let Some(r) = new_ready
            && old_ready.is_none_or(|o| o.reason != r.reason || o.message != r.message)
        {
            events.push(Transition::warning("InvalidSpec", r.message.clone()));
        }
        return events;
    }

    let first_apply = old_ready.is_none_or(|o| {
        o.reason == REASON_INVALID_SPEC && old.and_then(|s| s.server.as_ref()).is_none()
    });
    if first_apply {
        let outside = find(&new.conditions, AGENTS_AVAILABLE)
            .is_some_and(|c| c.reason == REASON_OUTSIDE_CLUSTER);
        let note = if outside {
            "created certificates, Services and server Deployment; agents run outside the cluster"
        } else {
            "created certificates, Services, server Deployment and agent DaemonSet"
        };
        events.push(Transition::normal("Created", note.into()));
    } else if old.and_then(|s| s.observed_generation) != new.observed_generation {
        events.push(Transition::normal(
            "Updated",
            format!(
                "applied generation {}",
                new.observed_generation.unwrap_or_default()
            ),
        ));
    }
    if certificates_renewed && !first_apply {
        events.push(Transition::normal(
            "CertificatesRenewed",
            "issued new certificates; pods roll to pick them up".into(),
        ));
    }
    if let Some(egress) = find(&new.conditions, EGRESS_CERTIFICATE_EXPIRING)
        && egress.status == "True"
        && old
            .and_then(|s| find(&s.conditions, EGRESS_CERTIFICATE_EXPIRING))
            .is_none_or(|o| o.status != "True" || o.message != egress.message)
    {
        events.push(Transition::warning(
            EGRESS_CERTIFICATE_EXPIRING,
            egress.message.clone(),
        ));
    }

    let was_ready = old_ready.is_some_and(|o| o.status == "True");
    match new_ready {
        Some(r) if r.status == "True" && !was_ready => {
            let reason = match old_ready {
                Some(o) if o.reason != REASON_PROGRESSING => "Recovered",
                _ => "Available",
            };
            events.push(Transition::normal(reason, r.message.clone()));
        }
        Some(r) if r.status != "True" && was_ready => {
            events.push(Transition::warning("Degraded", r.message.clone()));
        }
        _ => {}
    }
    events
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::crd::ServerLinks;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid"))
    }

    fn observed(server_ready: i32, agents_ready: i32) -> Observed {
        Observed {
            generation: Some(1),
            server: Some(ServerStatus {
                replicas: 2,
                ready_replicas: server_ready,
                summary: format!("{server_ready}/2"),
                linked_agents: Vec::new(),
            }),
            agents: Agents::DaemonSet(Some(AgentsStatus {
                desired: 3,
                ready: agents_ready,
                summary: format!("{agents_ready}/3"),
            })),
            frontend: None,
            certificates: Certificates::Ready {
                not_after: at(1_900_000_000),
                egress: Some(egress(1_900_000_000, None)),
            },
        }
    }

    fn egress(not_after: i64, replaced: Option<i64>) -> EgressCertificate {
        EgressCertificate {
            secret: "edge-apiserver-egress".into(),
            not_after: at(not_after),
            replaced: replaced.map(at),
        }
    }

    /// `observed(2, 3)` after a reconcile that found the egress certificate `egress`.
    fn with_egress(egress: EgressCertificate) -> Observed {
        Observed {
            certificates: Certificates::Ready {
                not_after: at(1_900_000_000),
                egress: Some(egress),
            },
            ..observed(2, 3)
        }
    }

    fn ready(status: &ControlPlaneLinkStatus) -> &Condition {
        find(&status.conditions, READY).expect("Ready condition")
    }

    #[test]
    fn a_fully_ready_link_is_ready_with_all_four_conditions_and_no_warning() {
        let status = desired_status(None, &observed(2, 3), &at(100));
        let types: Vec<_> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(
            types,
            [
                READY,
                SERVER_AVAILABLE,
                AGENTS_AVAILABLE,
                CERTIFICATES_READY,
                EGRESS_CERTIFICATE_EXPIRING
            ]
        );
        assert!(status.conditions[..4].iter().all(|c| c.status == "True"));
        let egress = &status.conditions[4];
        assert_eq!(
            (egress.status.as_str(), egress.reason.as_str()),
            ("False", "Current")
        );
        assert_eq!(ready(&status).message, "2/2 servers and 3/3 agents ready");
        assert_eq!(status.observed_generation, Some(1));
        assert_eq!(
            status.certificates.and_then(|c| c.not_after),
            Some(at(1_900_000_000))
        );
    }

    #[test]
    fn a_new_link_is_progressing_until_first_ready_then_names_what_broke() {
        let coming_up = desired_status(None, &observed(0, 0), &at(100));
        assert_eq!(ready(&coming_up).reason, REASON_PROGRESSING);
        assert_eq!(ready(&coming_up).message, "0/2 server replicas ready");

        let up = desired_status(Some(&coming_up), &observed(2, 3), &at(200));
        let broken = desired_status(Some(&up), &observed(2, 1), &at(300));
        assert_eq!(ready(&broken).status, "False");
        assert_eq!(ready(&broken).reason, "AgentsUnavailable");
        assert_eq!(ready(&broken).message, "1/3 agents ready");
    }

    #[test]
    fn transition_times_move_only_when_a_condition_flips() {
        let first = desired_status(None, &observed(1, 3), &at(100));
        let same = desired_status(Some(&first), &observed(2, 3), &at(200));
        assert_eq!(ready(&same).last_transition_time, at(100));
        assert_eq!(ready(&same).message, "2/2 servers and 3/3 agents ready");
        let flipped = desired_status(Some(&same), &observed(0, 3), &at(300));
        assert_eq!(ready(&flipped).last_transition_time, at(300));
    }

    #[test]
    fn certificate_trouble_makes_the_link_unready() {
        let mut obs = observed(2, 3);
        obs.certificates = Certificates::NotReady {
            reason: "CASecretNotFound",
            message: "secret \"my-ca\" not found".into(),
        };
        let up = desired_status(None, &observed(2, 3), &at(100));
        let status = desired_status(Some(&up), &obs, &at(200));
        assert_eq!(ready(&status).reason, "CertificatesNotReady");
        let certs = find(&status.conditions, CERTIFICATES_READY).expect("condition");
        assert_eq!(certs.reason, "CASecretNotFound");
        assert_eq!(
            status.certificates, up.certificates,
            "keeps the last known expiry"
        );
    }

    #[test]
    fn an_invalid_spec_replaces_only_the_ready_condition() {
        let up = desired_status(None, &observed(2, 3), &at(100));
        let invalid = InvalidSpec {
            field: "spec.tls.validity".into(),
            message: "invalid duration \"abc\"".into(),
        };
        let status = invalid_status(Some(&up), &invalid, Some(2), &at(200));
        assert_eq!(ready(&status).status, "False");
        assert_eq!(ready(&status).reason, "InvalidSpec");
        assert_eq!(
            ready(&status).message,
            "spec.tls.validity: invalid duration \"abc\""
        );
        assert_eq!(status.observed_generation, Some(2));
        assert_eq!(status.conditions.len(), 5);
        assert_eq!(status.server, up.server);
    }

    #[test]
    fn events_mark_creation_readiness_degradation_and_recovery_only() {
        let reasons = |old: Option<&ControlPlaneLinkStatus>, new: &ControlPlaneLinkStatus| {
            transitions(old, new, false)
                .into_iter()
                .map(|t| (t.reason, t.warning))
                .collect::<Vec<_>>()
        };
        let created = desired_status(None, &observed(0, 0), &at(1));
        assert_eq!(reasons(None, &created), [("Created", false)]);

        let still = desired_status(Some(&created), &observed(1, 0), &at(2));
        assert_eq!(reasons(Some(&created), &still), []);

        let up = desired_status(Some(&still), &observed(2, 3), &at(3));
        assert_eq!(reasons(Some(&still), &up), [("Available", false)]);
        assert_eq!(reasons(Some(&up), &up.clone()), []);

        let down = desired_status(Some(&up), &observed(0, 3), &at(4));
        assert_eq!(reasons(Some(&up), &down), [("Degraded", true)]);

        let back = desired_status(Some(&down), &observed(2, 3), &at(5));
        assert_eq!(reasons(Some(&down), &back), [("Recovered", false)]);

        let mut next = observed(2, 3);
        next.generation = Some(2);
        let updated = desired_status(Some(&back), &next, &at(6));
        assert_eq!(reasons(Some(&back), &updated), [("Updated", false)]);
        assert_eq!(
            transitions(Some(&updated), &updated, true)
                .into_iter()
                .map(|t| t.reason)
                .collect::<Vec<_>>(),
            ["CertificatesRenewed"]
        );
    }

    #[test]
    fn an_invalid_spec_is_reported_once_per_distinct_problem() {
        let invalid = InvalidSpec {
            field: "spec.logLevel".into(),
            message: "bad".into(),
        };
        let first = invalid_status(None, &invalid, Some(1), &at(1));
        let events = transitions(None, &first, false);
        assert_eq!(events.len(), 1);
        assert!(events[0].warning);
        assert_eq!(events[0].reason, "InvalidSpec");
        assert_eq!(events[0].note, "spec.logLevel: bad");
        assert_eq!(transitions(Some(&first), &first.clone(), false), []);

        let fixed = desired_status(Some(&first), &observed(0, 0), &at(2));
        assert_eq!(
            transitions(Some(&first), &fixed, false)[0].reason,
            "Created"
        );
    }

    fn links(counts: &[Option<i64>]) -> Vec<ServerLinks> {
        counts
            .iter()
            .enumerate()
            .map(|(n, agents)| ServerLinks {
                pod: format!("link-server-{n}"),
                agents: *agents,
            })
            .collect()
    }

    #[test]
    fn links_settle_once_every_server_counts_every_agent() {
        let obs = observed(2, 3);
        let agents = obs.agents.clone();
        let mut server = obs.server.clone().expect("server");
        assert!(
            links_settled(&server, &agents),
            "nothing listed, nothing to wait for"
        );
        server.linked_agents = links(&[Some(3), Some(3)]);
        assert!(links_settled(&server, &agents));
        server.linked_agents = links(&[Some(3), Some(2)]);
        assert!(
            !links_settled(&server, &agents),
            "one agent missing on a server"
        );
        server.linked_agents = links(&[Some(3), None]);
        assert!(!links_settled(&server, &agents), "a server did not answer");
    }

    #[test]
    fn linked_agents_reach_the_status_and_changing_counts_publish_no_event() {
        let mut obs = observed(2, 3);
        if let Some(server) = obs.server.as_mut() {
            server.linked_agents = links(&[Some(3), Some(1)]);
        }
        let first = desired_status(None, &obs, &at(1));
        let listed = &first.server.as_ref().expect("server").linked_agents;
        assert_eq!(listed[1].agents, Some(1));
        let json = serde_json::to_value(&first).expect("json");
        assert_eq!(
            json["server"]["linkedAgents"],
            serde_json::json!([
                {"pod": "link-server-0", "agents": 3},
                {"pod": "link-server-1", "agents": 1},
            ])
        );
        if let Some(server) = obs.server.as_mut() {
            server.linked_agents = links(&[Some(3), None]);
        }
        let second = desired_status(Some(&first), &obs, &at(2));
        assert_eq!(
            serde_json::to_value(&second).expect("json")["server"]["linkedAgents"][1],
            serde_json::json!({"pod": "link-server-1"}),
            "a server that did not answer is listed without a count"
        );
        assert_eq!(transitions(Some(&first), &second, false), []);
    }

    fn outside_the_cluster(server_ready: i32) -> Observed {
        Observed {
            agents: Agents::OutsideCluster,
            ..observed(server_ready, 0)
        }
    }

    #[test]
    fn agents_outside_the_cluster_are_available_by_definition_and_left_out_of_the_counts() {
        let status = desired_status(None, &outside_the_cluster(2), &at(1));
        let agents = find(&status.conditions, AGENTS_AVAILABLE).expect("condition");
        assert_eq!(agents.status, "True");
        assert_eq!(agents.reason, "OutsideCluster");
        assert!(
            agents.message.starts_with("agents run outside the cluster"),
            "{}",
            agents.message
        );
        assert_eq!(status.agents, None, "no DaemonSet to count");
        assert_eq!(ready(&status).status, "True");
        assert_eq!(
            ready(&status).message,
            "2/2 servers ready; agents run outside the cluster"
        );
        let json = serde_json::to_value(&status).expect("json");
        assert_eq!(json.get("agents"), None);

        let down = desired_status(Some(&status), &outside_the_cluster(0), &at(2));
        assert_eq!(ready(&down).reason, "ServerUnavailable");
    }

    #[test]
    fn creating_a_link_with_agents_outside_the_cluster_names_no_daemonset() {
        let created = desired_status(None, &outside_the_cluster(0), &at(1));
        let events = transitions(None, &created, false);
        assert_eq!(events[0].reason, "Created");
        assert_eq!(
            events[0].note,
            "created certificates, Services and server Deployment; agents run outside the cluster"
        );
        let in_cluster = desired_status(None, &observed(0, 0), &at(1));
        assert!(
            transitions(None, &in_cluster, false)[0]
                .note
                .contains("agent DaemonSet")
        );
    }

    #[test]
    fn links_of_agents_outside_the_cluster_settle_once_every_server_counts_the_same() {
        let agents = Agents::OutsideCluster;
        let mut server = outside_the_cluster(2).server.expect("server");
        assert!(links_settled(&server, &agents), "nothing listed");
        server.linked_agents = links(&[Some(4), Some(4)]);
        assert!(links_settled(&server, &agents));
        server.linked_agents = links(&[Some(4), Some(3)]);
        assert!(
            !links_settled(&server, &agents),
            "an agent not yet linked to every server"
        );
        server.linked_agents = links(&[None, None]);
        assert!(!links_settled(&server, &agents), "no server answered");
    }

    fn egress_condition_of(status: &ControlPlaneLinkStatus) -> &Condition {
        find(&status.conditions, EGRESS_CERTIFICATE_EXPIRING).expect("egress condition")
    }

    fn warnings(old: &ControlPlaneLinkStatus, new: &ControlPlaneLinkStatus) -> Vec<Transition> {
        transitions(Some(old), new, false)
            .into_iter()
            .filter(|t| t.reason == EGRESS_CERTIFICATE_EXPIRING)
            .collect()
    }

    #[test]
    fn replacing_the_egress_certificate_warns_until_the_replaced_one_expires() {
        let issued = desired_status(None, &with_egress(egress(1_000, None)), &at(100));
        assert_eq!(egress_condition_of(&issued).status, "False");

        // Renewed at 800: a kube-apiserver started before holds the one expiring at 1000.
        let renewed = desired_status(
            Some(&issued),
            &with_egress(egress(1_800, Some(1_000))),
            &at(800),
        );
        let warning = egress_condition_of(&renewed);
        assert_eq!(warning.status, "True");
        assert_eq!(warning.reason, "KubeAPIServerRestartNeeded");
        let deadline = at(1_000).0.to_string();
        assert!(
            warning.message.contains(&format!("before {deadline}"))
                && warning.message.contains("edge-apiserver-egress")
                && warning.message.contains("/etc/kubernetes/cplink")
                && warning.message.contains("restart kube-apiserver"),
            "{}",
            warning.message
        );
        let egress_status = renewed
            .certificates
            .as_ref()
            .and_then(|c| c.egress.clone())
            .expect("egress status");
        assert_eq!(egress_status.replaced_at, Some(at(800)));
        assert_eq!(egress_status.replaced_not_after, Some(at(1_000)));
        assert_eq!(egress_status.not_after, Some(at(1_800)));
        let events = warnings(&issued, &renewed);
        assert_eq!(events.len(), 1);
        assert!(events[0].warning);
        assert_eq!(events[0].note, warning.message);

        // Nothing new: no second Event.
        let steady = desired_status(Some(&renewed), &with_egress(egress(1_800, None)), &at(900));
        assert_eq!(egress_condition_of(&steady).status, "True");
        assert_eq!(warnings(&renewed, &steady), []);

        // Renewed again before the first replaced one expired: that one still sets the deadline.
        let again = desired_status(
            Some(&steady),
            &with_egress(egress(2_600, Some(1_800))),
            &at(950),
        );
        assert_eq!(egress_condition_of(&again).message, warning.message);
        assert_eq!(warnings(&steady, &again), []);

        // Past the deadline the warning ends, saying what a kube-apiserver not restarted gets.
        let expired = desired_status(Some(&again), &with_egress(egress(2_600, None)), &at(1_000));
        let ended = egress_condition_of(&expired);
        assert_eq!(ended.status, "False");
        assert_eq!(ended.reason, "ReplacedCertificateExpired");
        assert!(ended.message.contains("refused"), "{}", ended.message);
        assert_eq!(warnings(&again, &expired), []);

        // The next replacement warns again.
        let next = desired_status(
            Some(&expired),
            &with_egress(egress(3_400, Some(2_600))),
            &at(2_000),
        );
        assert_eq!(egress_condition_of(&next).status, "True");
        assert_eq!(warnings(&expired, &next).len(), 1);
    }

    #[test]
    fn in_grpc_mode_there_is_no_egress_certificate_to_warn_about() {
        let grpc = Observed {
            certificates: Certificates::Ready {
                not_after: at(1_900_000_000),
                egress: None,
            },
            ..observed(2, 3)
        };
        let status = desired_status(None, &grpc, &at(100));
        let egress = egress_condition_of(&status);
        assert_eq!(
            (egress.status.as_str(), egress.reason.as_str()),
            ("False", "NotUsed")
        );
        assert_eq!(status.certificates.and_then(|c| c.egress), None);
    }

    #[test]
    fn certificates_not_ready_keep_the_egress_warning() {
        let issued = desired_status(None, &with_egress(egress(1_000, None)), &at(100));
        let renewed = desired_status(
            Some(&issued),
            &with_egress(egress(1_800, Some(1_000))),
            &at(800),
        );
        let mut broken = observed(2, 3);
        broken.certificates = Certificates::NotReady {
            reason: "CASecretNotFound",
            message: "gone".into(),
        };
        let status = desired_status(Some(&renewed), &broken, &at(900));
        assert_eq!(egress_condition_of(&status), egress_condition_of(&renewed));
        assert_eq!(status.certificates, renewed.certificates);
    }
}
