//! Certificate Secrets and the kube-apiserver egress selector configuration.
//!
//! Every certificate Secret holds `tls.crt`, `tls.key` and `ca.crt`. The egress Secret adds
//! `egress-selector-configuration.yaml`. In `HTTPConnect` mode it expects the three PEM files
//! under [`EGRESS_DIR`] on the control plane host, i.e. the Secret's keys copied (or mounted)
//! there; in `GRPC` mode it names the server's Unix socket on that host and needs no files.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{Component, Plan};
use crate::certs::{CertPair, StoredCa, StoredLeaf};
use crate::crd::{DirectEgress, FrontendMode};

/// Key of the certificate.
pub const TLS_CRT: &str = "tls.crt";
/// Key of the private key.
pub const TLS_KEY: &str = "tls.key";
/// Key of the CA bundle.
pub const CA_CRT: &str = "ca.crt";
/// Key of the generated CA's successor while it waits to sign.
pub const NEXT_KEY: &str = "next.key";
/// Key of the egress selector configuration file.
pub const EGRESS_CONFIG_KEY: &str = "egress-selector-configuration.yaml";
/// Directory on the control plane host where the egress file expects `ca.crt`, `tls.crt` and
/// `tls.key` (the egress Secret's keys).
pub const EGRESS_DIR: &str = "/etc/kubernetes/cplink";

fn data(entries: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
    entries
        .iter()
        .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
        .collect()
}

fn tls_secret(
    plan: &Plan,
    name: String,
    component: Component,
    pair: &CertPair,
    ca_pem: &str,
) -> Secret {
    Secret {
        metadata: plan.meta(name, component),
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(data(&[
            (TLS_CRT, &pair.cert_pem),
            (TLS_KEY, &pair.key_pem),
            (CA_CRT, ca_pem),
        ])),
        ..Secret::default()
    }
}

/// The generated CA (`<link>-ca`); only the operator reads its keys. While a successor CA
/// waits to sign, its key is kept under `next.key`.
pub fn ca_secret(plan: &Plan, ca: &StoredCa) -> Secret {
    let mut secret = tls_secret(
        plan,
        plan.names().ca_secret(),
        Component::Server,
        &ca.pair,
        &ca.pair.cert_pem,
    );
    if let (Some(next), Some(data)) = (&ca.next_key, secret.data.as_mut()) {
        data.insert(NEXT_KEY.to_owned(), ByteString(next.as_bytes().to_vec()));
    }
    secret
}

/// The generated CA as its Secret holds it.
pub fn read_ca(secret: &Secret) -> Option<StoredCa> {
    Some(StoredCa {
        pair: read_pair(secret)?,
        next_key: text(secret, NEXT_KEY),
    })
}

/// The server certificate, mounted by server pods.
pub fn server_tls_secret(plan: &Plan, pair: &CertPair, ca_pem: &str) -> Secret {
    tls_secret(
        plan,
        plan.names().server_tls_secret(),
        Component::Server,
        pair,
        ca_pem,
    )
}

/// The agent client certificate, mounted by agent pods.
pub fn agent_tls_secret(plan: &Plan, pair: &CertPair, ca_pem: &str) -> Secret {
    tls_secret(
        plan,
        plan.names().agent_tls_secret(),
        Component::Agent,
        pair,
        ca_pem,
    )
}

/// kube-apiserver's client certificate plus a ready-to-use egress selector configuration.
pub fn egress_secret(
    plan: &Plan,
    pair: &CertPair,
    ca_pem: &str,
) -> Result<Secret, crate::yaml::Error> {
    let config = egress_configuration(plan)?;
    Ok(Secret {
        metadata: plan.meta(plan.names().egress_secret(), Component::Server),
        type_: Some("Opaque".to_owned()),
        data: Some(data(&[
            (EGRESS_CONFIG_KEY, &config),
            (CA_CRT, ca_pem),
            (TLS_CRT, &pair.cert_pem),
            (TLS_KEY, &pair.key_pem),
        ])),
        ..Secret::default()
    })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EgressSelectorConfiguration {
    api_version: &'static str,
    kind: &'static str,
    egress_selections: Vec<EgressSelection>,
}

#[derive(Serialize)]
struct EgressSelection {
    name: &'static str,
    connection: Connection,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Connection {
    proxy_protocol: &'static str,
    /// Absent for `Direct`, which kube-apiserver refuses with one.
    #[serde(skip_serializing_if = "Option::is_none")]
    transport: Option<Transport>,
}

/// Exactly one of `tcp` and `uds`.
#[derive(Serialize)]
struct Transport {
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp: Option<Tcp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uds: Option<Uds>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Tcp {
    url: String,
    tls_config: TlsConfig,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TlsConfig {
    ca_bundle: String,
    client_cert: String,
    client_key: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Uds {
    uds_name: String,
}

/// The `EgressSelectorConfiguration` that sends kube-apiserver's cluster traffic (kubelet,
/// pods, services) through the link: HTTP CONNECT over mutual TLS to the frontend, or in `GRPC`
/// mode konnectivity gRPC over the server's Unix socket on the same host; then the selections
/// of `frontend.directEgress` as `Direct`.
///
/// Valid from kube-apiserver 1.20 to 1.34: `apiserver.k8s.io/v1beta1` is read from 1.20 on;
/// the names are `cluster`, `controlplane` and `etcd`, never the `master` alias later versions
/// refuse; each at most once; no field beyond the schema's (newer versions decode strictly);
/// no `transport` for `Direct`.
pub fn egress_configuration(plan: &Plan) -> Result<String, crate::yaml::Error> {
    let (proxy_protocol, transport) = match &plan.valid.grpc_socket {
        Some(socket) => (
            FrontendMode::Grpc,
            Transport {
                tcp: None,
                uds: Some(Uds {
                    uds_name: socket.clone(),
                }),
            },
        ),
        None => (
            FrontendMode::HttpConnect,
            Transport {
                tcp: Some(Tcp {
                    url: format!("https://{}", plan.frontend_address()),
                    tls_config: TlsConfig {
                        ca_bundle: format!("{EGRESS_DIR}/{CA_CRT}"),
                        client_cert: format!("{EGRESS_DIR}/{TLS_CRT}"),
                        client_key: format!("{EGRESS_DIR}/{TLS_KEY}"),
                    },
                }),
                uds: None,
            },
        ),
    };
    let mut egress_selections = vec![EgressSelection {
        name: "cluster",
        connection: Connection {
            proxy_protocol: proxy_protocol.as_str(),
            transport: Some(transport),
        },
    }];
    let direct = &plan.spec.server.frontend.direct_egress;
    egress_selections.extend(
        DirectEgress::ALL
            .into_iter()
            .filter(|selection| direct.contains(selection))
            .map(|selection| EgressSelection {
                name: selection.as_str(),
                connection: Connection {
                    proxy_protocol: "Direct",
                    transport: None,
                },
            }),
    );
    crate::yaml::to_string(&EgressSelectorConfiguration {
        api_version: "apiserver.k8s.io/v1beta1",
        kind: "EgressSelectorConfiguration",
        egress_selections,
    })
}

/// sha256 (hex) over a Secret's keys and values, for the pod template annotation.
pub fn checksum(secret: &Secret) -> String {
    let mut hasher = Sha256::new();
    for (key, value) in secret.data.iter().flatten() {
        // Length prefixes keep ("ab","c") and ("a","bc") apart.
        hasher.update((key.len() as u64).to_be_bytes());
        hasher.update(key.as_bytes());
        hasher.update((value.0.len() as u64).to_be_bytes());
        hasher.update(&value.0);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// The certificate and key of a Secret, if it has both as UTF-8 text.
pub fn read_pair(secret: &Secret) -> Option<CertPair> {
    Some(CertPair {
        cert_pem: text(secret, TLS_CRT)?,
        key_pem: text(secret, TLS_KEY)?,
    })
}

/// A leaf certificate Secret as written by [`server_tls_secret`] and friends.
pub fn read_leaf(secret: &Secret) -> Option<StoredLeaf> {
    Some(StoredLeaf {
        pair: read_pair(secret)?,
        ca_pem: text(secret, CA_CRT)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ControlPlaneLink;

    fn pair(tag: &str) -> CertPair {
        CertPair {
            cert_pem: format!("CERT {tag}"),
            key_pem: format!("KEY {tag}"),
        }
    }

    fn value(secret: &Secret, key: &str) -> String {
        text(secret, key).unwrap_or_else(|| panic!("{key} missing"))
    }

    #[test]
    fn certificate_secrets_hold_cert_key_and_ca() {
        let plan = ControlPlaneLink::test().plan();
        let server = server_tls_secret(&plan, &pair("server"), "CA");
        assert_eq!(server.metadata.name.as_deref(), Some("link-server-tls"));
        assert_eq!(server.type_.as_deref(), Some("kubernetes.io/tls"));
        assert_eq!(value(&server, "tls.crt"), "CERT server");
        assert_eq!(value(&server, "tls.key"), "KEY server");
        assert_eq!(value(&server, "ca.crt"), "CA");

        let agent = agent_tls_secret(&plan, &pair("agent"), "CA");
        assert_eq!(agent.metadata.name.as_deref(), Some("link-agent-tls"));
        assert_eq!(
            agent.metadata.labels.as_ref().expect("labels")["app.kubernetes.io/component"],
            "agent"
        );

        let stored = StoredCa {
            pair: pair("ca"),
            next_key: None,
        };
        let ca = ca_secret(&plan, &stored);
        assert_eq!(ca.metadata.name.as_deref(), Some("link-ca"));
        assert_eq!(value(&ca, "ca.crt"), "CERT ca");
        assert!(!ca.data.as_ref().expect("data").contains_key(NEXT_KEY));
        assert_eq!(read_ca(&ca), Some(stored));

        // A successor's key waits in its own entry and reads back.
        let rotating = StoredCa {
            pair: pair("ca"),
            next_key: Some("KEY next".into()),
        };
        let ca = ca_secret(&plan, &rotating);
        assert_eq!(value(&ca, NEXT_KEY), "KEY next");
        assert_eq!(read_ca(&ca), Some(rotating));
    }

    /// An egress selector configuration for the `cluster` egress, reached over `connection`.
    fn egress_file(connection: &str) -> String {
        format!(
            "\
apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
- name: cluster
  connection:
{connection}"
        )
    }

    #[test]
    fn the_egress_secret_holds_a_ready_to_use_configuration() {
        let plan = ControlPlaneLink::test().plan();
        let secret = egress_secret(&plan, &pair("apiserver"), "CA").expect("yaml");
        assert_eq!(
            secret.metadata.name.as_deref(),
            Some("link-apiserver-egress")
        );
        assert_eq!(value(&secret, "tls.crt"), "CERT apiserver");
        assert_eq!(value(&secret, "tls.key"), "KEY apiserver");
        assert_eq!(value(&secret, "ca.crt"), "CA");
        assert_eq!(
            value(&secret, "egress-selector-configuration.yaml"),
            egress_file(
                "    proxyProtocol: HTTPConnect
    transport:
      tcp:
        url: https://link-frontend.tunnels.svc:8090
        tlsConfig:
          caBundle: /etc/kubernetes/cplink/ca.crt
          clientCert: /etc/kubernetes/cplink/tls.crt
          clientKey: /etc/kubernetes/cplink/tls.key
"
            )
        );
    }

    #[test]
    fn pass_through_selections_follow_cluster_as_direct_without_transport() {
        let plan = ControlPlaneLink::test()
            .with_spec(|s| {
                s.server.frontend.mode = FrontendMode::Grpc;
                s.server.frontend.socket_host_path = Some("/etc/kubernetes/cplink".into());
                // Listed in any order, written in a fixed one.
                s.server.frontend.direct_egress =
                    vec![DirectEgress::Etcd, DirectEgress::ControlPlane];
            })
            .plan();
        assert_eq!(
            egress_configuration(&plan).expect("yaml"),
            egress_file(
                "    proxyProtocol: GRPC
    transport:
      uds:
        udsName: /etc/kubernetes/cplink/konnectivity-server.socket
- name: controlplane
  connection:
    proxyProtocol: Direct
- name: etcd
  connection:
    proxyProtocol: Direct
"
            )
        );
        let only_etcd = ControlPlaneLink::test()
            .with_spec(|s| s.server.frontend.direct_egress = vec![DirectEgress::Etcd])
            .plan();
        let config = egress_configuration(&only_etcd).expect("yaml");
        assert!(
            config.ends_with("- name: etcd\n  connection:\n    proxyProtocol: Direct\n"),
            "{config}"
        );
        assert!(!config.contains("controlplane"), "{config}");
    }

    /// Names and fields every kube-apiserver from 1.20 to 1.34 accepts: no `master` (the alias
    /// 1.32 and later no longer convert), no selection twice, nothing but the schema's fields.
    #[test]
    fn the_egress_file_uses_only_names_and_fields_every_version_reads() {
        let plan = ControlPlaneLink::test()
            .with_spec(|s| s.server.frontend.direct_egress = DirectEgress::ALL.to_vec())
            .plan();
        let config = egress_configuration(&plan).expect("yaml");
        let parsed: serde_json::Value = serde_saphyr::from_str(&config).expect("YAML");
        assert_eq!(parsed["apiVersion"], "apiserver.k8s.io/v1beta1");
        let selections = parsed["egressSelections"].as_array().expect("a list");
        let names: Vec<&str> = selections
            .iter()
            .map(|s| s["name"].as_str().expect("a name"))
            .collect();
        assert_eq!(names, ["cluster", "controlplane", "etcd"]);
        let allowed = |value: &serde_json::Value, keys: &[&str]| {
            value
                .as_object()
                .expect("an object")
                .keys()
                .all(|k| keys.contains(&k.as_str()))
        };
        assert!(allowed(
            &parsed,
            &["apiVersion", "kind", "egressSelections"]
        ));
        for selection in selections {
            assert!(allowed(selection, &["name", "connection"]), "{selection}");
            assert!(
                allowed(&selection["connection"], &["proxyProtocol", "transport"]),
                "{selection}"
            );
        }
    }

    #[test]
    fn the_egress_url_uses_the_external_address_when_set() {
        let plan = ControlPlaneLink::test()
            .with_spec(|s| {
                s.server.frontend.external_address = Some("fd00::7".into());
                s.server.frontend.port = 9443;
            })
            .plan();
        let config = egress_configuration(&plan).expect("yaml");
        assert!(config.contains("url: https://[fd00::7]:9443\n"), "{config}");
    }

    #[test]
    fn in_grpc_mode_the_egress_file_names_the_socket_on_the_host() {
        let plan = ControlPlaneLink::test()
            .in_grpc_mode("/etc/kubernetes/cplink-frontend")
            .plan();
        let secret = egress_secret(&plan, &pair("apiserver"), "CA").expect("yaml");
        assert_eq!(
            value(&secret, "egress-selector-configuration.yaml"),
            egress_file(
                "    proxyProtocol: GRPC
    transport:
      uds:
        udsName: /etc/kubernetes/cplink-frontend/konnectivity-server.socket
"
            )
        );
        // The client certificate stays, for clients of the TLS frontend.
        assert_eq!(value(&secret, "tls.crt"), "CERT apiserver");
    }

    #[test]
    fn the_checksum_follows_the_data_only() {
        let plan = ControlPlaneLink::test().plan();
        let a = server_tls_secret(&plan, &pair("a"), "CA");
        let mut relabelled = a.clone();
        relabelled.metadata.labels = None;
        let b = server_tls_secret(&plan, &pair("b"), "CA");
        assert_eq!(checksum(&a), checksum(&relabelled));
        assert_ne!(checksum(&a), checksum(&b));
        assert_eq!(checksum(&a).len(), 64);
    }

    #[test]
    fn stored_certificates_read_back_as_written() {
        let plan = ControlPlaneLink::test().plan();
        let secret = agent_tls_secret(&plan, &pair("agent"), "CA");
        let leaf = read_leaf(&secret).expect("complete secret");
        assert_eq!(leaf.pair, pair("agent"));
        assert_eq!(leaf.ca_pem, "CA");

        let mut incomplete = secret;
        incomplete.data.as_mut().expect("data").remove("tls.key");
        assert_eq!(read_leaf(&incomplete), None);
    }
}
