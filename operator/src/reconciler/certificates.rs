//! The link's certificates: its CA (generated, or read from `spec.tls.caSecretRef`) and the
//! server, agent and kube-apiserver leaves, each reused until due for renewal.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use time::OffsetDateTime;

use super::Error;
use crate::certs::{self, CaStep, CertError, CertPair, Profile};
use crate::resources::{Plan, secrets};

/// Certificate Secrets ready to apply.
pub(super) struct Issued {
    /// The generated CA's Secret; `None` with `spec.tls.caSecretRef`.
    pub(super) ca: Option<Secret>,
    /// The servers' certificate and key.
    pub(super) server: Secret,
    /// The agents' client certificate and key.
    pub(super) agent: Secret,
    /// kube-apiserver's client certificate and its egress selector configuration.
    pub(super) egress: Secret,
    /// Earliest expiry among CA and leaves.
    pub(super) not_after: OffsetDateTime,
    /// Expiry of each certificate, by the `certificate` label of
    /// `cplink_operator_certificate_expiry_timestamp_seconds`.
    pub(super) expiries: Vec<(&'static str, OffsetDateTime)>,
    /// Earliest renewal among CA and leaves.
    pub(super) renew_at: OffsetDateTime,
    /// Whether an existing certificate was replaced in this pass.
    pub(super) renewed: bool,
    /// The step the generated CA took in this pass, if any (none for a new link's CA).
    pub(super) ca_step: Option<CaStep>,
    /// Expiry of kube-apiserver's client certificate in the egress Secret.
    pub(super) egress_not_after: OffsetDateTime,
    /// Expiry of the client certificate this pass replaced in the egress Secret, unless it had
    /// expired: kube-apiserver, reading its files only when it starts, may still present it.
    pub(super) egress_replaced: Option<OffsetDateTime>,
}

/// Whether the link's certificates are ready to apply, or why not.
pub(super) enum CertOutcome {
    Ready(Box<Issued>),
    NotReady {
        reason: &'static str,
        message: String,
    },
}

/// Finds or makes the CA, then reuses or issues each leaf.
pub(super) async fn certificates(
    api: &Api<Secret>,
    plan: &Plan,
    now: OffsetDateTime,
) -> Result<CertOutcome, Error> {
    let names = plan.names();
    let renew_before = plan.valid.renew_before;
    let mut renewed = false;
    let mut ca_step = None;
    let mut ca_next_step_at = None;

    let (ca, ca_info, ca_secret) = match &plan.spec.tls.ca_secret_ref {
        Some(reference) => {
            let field = "spec.tls.caSecretRef";
            let Some(secret) = get_secret(api, &reference.name).await? else {
                return Ok(CertOutcome::NotReady {
                    reason: "CASecretNotFound",
                    message: format!("{field}: Secret {:?} not found", reference.name),
                });
            };
            let Some(ca) = secrets::read_pair(&secret) else {
                return Ok(CertOutcome::NotReady {
                    reason: "CASecretInvalid",
                    message: format!(
                        "{field}: Secret {:?} needs tls.crt and tls.key",
                        reference.name
                    ),
                });
            };
            match certs::ca_is_reusable(&ca, renew_before, now) {
                Ok(info) => (ca, info, None),
                Err(problem) => {
                    return Ok(CertOutcome::NotReady {
                        reason: "CASecretInvalid",
                        message: format!("{field}: Secret {:?}: {problem}", reference.name),
                    });
                }
            }
        }
        None => {
            let stored = get_secret(api, &names.ca_secret()).await?;
            let decision = certs::generated_ca(
                stored.as_ref().and_then(secrets::read_ca).as_ref(),
                &format!("cplink {}/{}", plan.namespace, plan.name),
                plan.valid.validity,
                renew_before,
                now,
            )?;
            // A CA made for a new link is no step worth an Event.
            if let Some(step) = decision.step.filter(|_| stored.is_some()) {
                renewed = true;
                ca_step = Some(step);
                tracing::info!(
                    link = %format!("{}/{}", plan.namespace, plan.name),
                    step = step.describe(),
                    next_step_at = %decision.next_step_at,
                    "CA"
                );
            }
            ca_next_step_at = Some(decision.next_step_at);
            let secret = secrets::ca_secret(plan, &decision.ca);
            (decision.ca.pair, decision.info, Some(secret))
        }
    };

    let (dns_names, ips) = plan.server_sans();
    let leaves = [
        (
            "server",
            names.server_tls_secret(),
            Profile::Server {
                common_name: names.server(),
                dns_names,
                ips,
            },
        ),
        (
            "agent",
            names.agent_tls_secret(),
            Profile::Client {
                common_name: "cplink-agent".into(),
            },
        ),
        (
            "apiserver",
            names.egress_secret(),
            Profile::Client {
                common_name: "cplink-apiserver".into(),
            },
        ),
    ];
    let mut not_after = ca_info.not_after;
    // A generated CA is replaced in steps, each on its own date; one given by the user is
    // renewed by the user.
    let mut renew_at = ca_next_step_at.unwrap_or_else(|| ca_info.renew_at(renew_before));
    let mut expiries = vec![("ca", ca_info.not_after)];
    let mut pairs: Vec<CertPair> = Vec::with_capacity(leaves.len());
    let mut egress_not_after = not_after;
    let mut egress_replaced = None;
    for (kind, secret_name, profile) in &leaves {
        let stored = get_secret(api, secret_name).await?;
        let stored_leaf = stored.as_ref().and_then(secrets::read_leaf);
        let (pair, info) =
            match certs::reusable_leaf(stored_leaf.as_ref(), &ca, profile, renew_before, now) {
                Some(info) => (stored_leaf.map(|l| l.pair), info),
                None => {
                    renewed |= stored.is_some();
                    if *kind == "apiserver" {
                        egress_replaced = stored_leaf
                            .as_ref()
                            .and_then(|leaf| certs::inspect(&leaf.pair.cert_pem).ok())
                            .map(|info| info.not_after)
                            .filter(|expiry| *expiry > now);
                    }
                    let pair = certs::issue(&ca, profile, plan.valid.validity, now)?;
                    let info = certs::inspect(&pair.cert_pem)?;
                    (Some(pair), info)
                }
            };
        if *kind == "apiserver" {
            egress_not_after = info.not_after;
        }
        not_after = not_after.min(info.not_after);
        expiries.push((*kind, info.not_after));
        renew_at = renew_at.min(info.renew_at(renew_before));
        // `reusable_leaf` only succeeds for a parsed stored leaf, so the pair is always present.
        pairs.extend(pair);
    }
    let [server, agent, apiserver] = <[CertPair; 3]>::try_from(pairs)
        .map_err(|_| CertError::InvalidCertificate("stored leaf vanished".into()))?;
    Ok(CertOutcome::Ready(Box::new(Issued {
        server: secrets::server_tls_secret(plan, &server, &ca.cert_pem),
        agent: secrets::agent_tls_secret(plan, &agent, &ca.cert_pem),
        egress: secrets::egress_secret(plan, &apiserver, &ca.cert_pem)?,
        ca: ca_secret,
        not_after,
        expiries,
        renew_at,
        renewed,
        ca_step,
        egress_not_after,
        egress_replaced,
    })))
}

async fn get_secret(api: &Api<Secret>, name: &str) -> Result<Option<Secret>, Error> {
    api.get_opt(name).await.map_err(|source| Error::Get {
        kind: "Secret".into(),
        name: name.to_owned(),
        source,
    })
}
