//! A container's environment, resolved the way kubelet resolves it: `envFrom` first, then `env`
//! in order, each value expanded against what came before; downward-API fields, Secret and
//! ConfigMap keys looked up; `$(VAR)` references in command and args expanded.

use std::collections::BTreeMap;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, Secret};
use kube::Api;

/// What the downward API can tell a container about its pod.
#[derive(Debug, Clone)]
pub struct PodFacts {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `spec.nodeName`.
    pub node_name: String,
    /// `spec.serviceAccountName`.
    pub service_account: String,
    /// `status.hostIP`.
    pub host_ip: String,
    /// `status.podIP`.
    pub pod_ip: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
}

impl PodFacts {
    /// The value of a `fieldRef.fieldPath`, as kubelet supports them.
    pub fn field(&self, path: &str) -> anyhow::Result<String> {
        let map_key = |prefix: &str| {
            path.strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix("['"))
                .and_then(|rest| rest.strip_suffix("']"))
        };
        Ok(match path {
            "metadata.name" => self.name.clone(),
            "metadata.namespace" => self.namespace.clone(),
            "metadata.uid" => self.uid.clone(),
            "spec.nodeName" => self.node_name.clone(),
            "spec.serviceAccountName" => self.service_account.clone(),
            "status.hostIP" => self.host_ip.clone(),
            "status.podIP" | "status.podIPs" => self.pod_ip.clone(),
            _ => {
                if let Some(key) = map_key("metadata.labels") {
                    self.labels.get(key).cloned().unwrap_or_default()
                } else if let Some(key) = map_key("metadata.annotations") {
                    self.annotations.get(key).cloned().unwrap_or_default()
                } else {
                    anyhow::bail!("unsupported fieldRef.fieldPath {path:?}")
                }
            }
        })
    }
}

/// Expands `$(NAME)` references from `vars` as kubelet does: a defined name is replaced, an
/// undefined one is kept as written, and `$$` stands for a literal `$`.
pub fn expand(input: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('(') {
            match body.find(')') {
                Some(close) => {
                    let name = &body[..close];
                    match vars.get(name) {
                        Some(value) => out.push_str(value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &body[close + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = body;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Where Secrets and ConfigMaps of the pod's namespace are read from.
pub struct Lookup {
    secrets: Api<Secret>,
    config_maps: Api<ConfigMap>,
}

impl Lookup {
    /// Looks objects up in `namespace`.
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Lookup {
            secrets: Api::namespaced(client.clone(), namespace),
            config_maps: Api::namespaced(client, namespace),
        }
    }

    /// All keys of a Secret, decoded; `None` if it does not exist.
    pub async fn secret(&self, name: &str) -> anyhow::Result<Option<BTreeMap<String, Vec<u8>>>> {
        let secret = self
            .secrets
            .get_opt(name)
            .await
            .with_context(|| format!("cannot read Secret {name}"))?;
        Ok(secret.map(|s| {
            let mut data: BTreeMap<String, Vec<u8>> = s
                .string_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            data.extend(
                s.data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0)),
            );
            data
        }))
    }

    /// All keys of a ConfigMap; `None` if it does not exist.
    pub async fn config_map(
        &self,
        name: &str,
    ) -> anyhow::Result<Option<BTreeMap<String, Vec<u8>>>> {
        let map = self
            .config_maps
            .get_opt(name)
            .await
            .with_context(|| format!("cannot read ConfigMap {name}"))?;
        Ok(map.map(|m| {
            let mut data: BTreeMap<String, Vec<u8>> = m
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            data.extend(
                m.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0)),
            );
            data
        }))
    }
}

/// The environment of `container`: `base` (the service variables kubelet injects), then
/// `envFrom`, then `env`.
pub async fn container_env(
    lookup: &Lookup,
    container: &Container,
    facts: &PodFacts,
    base: &BTreeMap<String, String>,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut vars = base.clone();
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.as_deref().unwrap_or_default();
        let (kind, name, optional, data) = if let Some(s) = &source.secret_ref {
            let data = lookup.secret(&s.name).await?;
            ("Secret", &s.name, s.optional.unwrap_or(false), data)
        } else if let Some(c) = &source.config_map_ref {
            let data = lookup.config_map(&c.name).await?;
            ("ConfigMap", &c.name, c.optional.unwrap_or(false), data)
        } else {
            continue;
        };
        match data {
            Some(data) => {
                for (key, value) in data {
                    vars.insert(
                        format!("{prefix}{key}"),
                        String::from_utf8_lossy(&value).into_owned(),
                    );
                }
            }
            None if optional => {}
            None => anyhow::bail!("envFrom: {kind} {name:?} not found"),
        }
    }
    for var in container.env.iter().flatten() {
        if let Some(value) = env_value(lookup, var, facts, &vars).await? {
            vars.insert(var.name.clone(), value);
        }
    }
    Ok(vars)
}

async fn env_value(
    lookup: &Lookup,
    var: &EnvVar,
    facts: &PodFacts,
    vars: &BTreeMap<String, String>,
) -> anyhow::Result<Option<String>> {
    let Some(from) = &var.value_from else {
        return Ok(Some(expand(var.value.as_deref().unwrap_or_default(), vars)));
    };
    let what = || format!("env {}", var.name);
    if let Some(field) = &from.field_ref {
        return facts.field(&field.field_path).map(Some).with_context(what);
    }
    let (kind, name, key, optional, data) = if let Some(s) = &from.secret_key_ref {
        let data = lookup.secret(&s.name).await?;
        ("Secret", &s.name, &s.key, s.optional.unwrap_or(false), data)
    } else if let Some(c) = &from.config_map_key_ref {
        let data = lookup.config_map(&c.name).await?;
        (
            "ConfigMap",
            &c.name,
            &c.key,
            c.optional.unwrap_or(false),
            data,
        )
    } else {
        anyhow::bail!(
            "{}: only fieldRef, secretKeyRef and configMapKeyRef are supported",
            what()
        );
    };
    match data.and_then(|mut d| d.remove(key)) {
        Some(value) => Ok(Some(String::from_utf8_lossy(&value).into_owned())),
        None if optional => Ok(None),
        None => anyhow::bail!("{}: key {key:?} of {kind} {name:?} not found", what()),
    }
}

/// The downward-API facts of a pod given its addresses.
pub fn facts(pod: &Pod, host_ip: &str, pod_ip: &str) -> PodFacts {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    PodFacts {
        name: meta.name.clone().unwrap_or_default(),
        namespace: meta.namespace.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        node_name: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned()),
        host_ip: host_ip.to_owned(),
        pod_ip: pod_ip.to_owned(),
        labels: meta.labels.clone().unwrap_or_default(),
        annotations: meta.annotations.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defined_references_expand_and_undefined_ones_stay() {
        let v = vars(&[("POD_IP", "127.9.1.2"), ("EMPTY", "")]);
        assert_eq!(expand("--addr=$(POD_IP):9443", &v), "--addr=127.9.1.2:9443");
        assert_eq!(expand("$(MISSING)/x", &v), "$(MISSING)/x");
        assert_eq!(expand("a$(EMPTY)b", &v), "ab");
        assert_eq!(expand("$(POD_IP)$(POD_IP)", &v), "127.9.1.2127.9.1.2");
    }

    #[test]
    fn dollars_escape_and_stray_dollars_are_kept() {
        let v = vars(&[("X", "1")]);
        assert_eq!(expand("$$(X)", &v), "$(X)");
        assert_eq!(expand("cost $5 $", &v), "cost $5 $");
        assert_eq!(expand("$(X", &v), "$(X");
    }

    #[test]
    fn downward_api_fields_resolve_and_unknown_ones_are_refused() {
        let facts = PodFacts {
            name: "p".into(),
            namespace: "ns".into(),
            uid: "u".into(),
            node_name: "node-1".into(),
            service_account: "sa".into(),
            host_ip: "127.9.0.1".into(),
            pod_ip: "127.9.1.2".into(),
            labels: BTreeMap::from([("app".to_owned(), "x".to_owned())]),
            annotations: BTreeMap::new(),
        };
        assert_eq!(facts.field("spec.nodeName").unwrap(), "node-1");
        assert_eq!(facts.field("status.hostIP").unwrap(), "127.9.0.1");
        assert_eq!(facts.field("status.podIP").unwrap(), "127.9.1.2");
        assert_eq!(facts.field("metadata.labels['app']").unwrap(), "x");
        assert_eq!(facts.field("metadata.annotations['none']").unwrap(), "");
        let err = facts.field("spec.hostname").unwrap_err().to_string();
        assert!(err.contains("spec.hostname"), "{err}");
    }
}
