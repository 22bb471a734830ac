//! Asking every server of a link the same question: the link's running server pods, each
//! asked in turn, each answer or failure kept against its pod.

use cplink_operator::crd::ControlPlaneLink;
use k8s_openapi::api::core::v1::Pod;
use serde::de::DeserializeOwned;

use crate::cluster::{Cluster, ReadError, SERVER_ADMIN_PORT};

/// The running server pods of `link`, by name; an error when none runs.
pub async fn running(cluster: &Cluster, link: &ControlPlaneLink) -> Result<Vec<Pod>, ReadError> {
    let name = link.metadata.name.clone().unwrap_or_default();
    let pods: Vec<Pod> = cluster
        .pods(&name, "server")
        .await?
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .collect();
    if pods.is_empty() {
        return Err(ReadError::Api(format!(
            "link {}/{name} has no running server pod",
            cluster.namespace
        )));
    }
    Ok(pods)
}

/// `path?query` of every pod's debug views, in the pods' order: (pod name, answer or why
/// not).
pub async fn ask<T: DeserializeOwned>(
    cluster: &Cluster,
    pods: &[Pod],
    path: &str,
    query: &[(&str, &str)],
) -> Vec<(String, Result<T, ReadError>)> {
    let mut answers = Vec::with_capacity(pods.len());
    for pod in pods {
        let name = pod.metadata.name.clone().unwrap_or_default();
        answers.push((
            name,
            cluster.view(pod, SERVER_ADMIN_PORT, path, query).await,
        ));
    }
    answers
}
