//! A pod's volumes materialized as directories: Secret, ConfigMap, projected (Secret,
//! ConfigMap, service account token, downward API), downward API and emptyDir volumes, with
//! their `items` and file modes, and hostPath directories as they are on the host. The pod
//! runner bind-mounts each at its `mountPath`.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

use anyhow::Context as _;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    DownwardAPIVolumeFile, HostPathVolumeSource, KeyToPath, ServiceAccount, Volume,
};
use kube::Api;
use kube::api::PostParams;

use super::env::{Lookup, PodFacts};

/// Kubelet's default file mode of projected keys (0644).
const DEFAULT_MODE: i32 = 0o644;
/// Mode of a directory kubelet creates for a `DirectoryOrCreate` hostPath.
const HOST_DIR_MODE: u32 = 0o755;

/// Writes every volume of the pod under `dir/<volume name>` and returns the directories by
/// volume name; a hostPath volume is its directory on the host, checked or created.
pub async fn materialize(
    client: &kube::Client,
    lookup: &Lookup,
    facts: &PodFacts,
    volumes: &[Volume],
    dir: &Path,
) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    for volume in volumes {
        if let Some(host) = &volume.host_path {
            let path = host_directory(host).with_context(|| format!("volume {:?}", volume.name))?;
            out.insert(volume.name.clone(), path);
            continue;
        }
        let target = dir.join(&volume.name);
        std::fs::create_dir_all(&target)?;
        write_volume(client, lookup, facts, volume, &target)
            .await
            .with_context(|| format!("volume {:?}", volume.name))?;
        out.insert(volume.name.clone(), target);
    }
    Ok(out)
}

async fn write_volume(
    client: &kube::Client,
    lookup: &Lookup,
    facts: &PodFacts,
    volume: &Volume,
    target: &Path,
) -> anyhow::Result<()> {
    if volume.empty_dir.is_some() {
        return Ok(());
    }
    if let Some(secret) = &volume.secret {
        let name = secret.secret_name.as_deref().unwrap_or_default();
        let mode = secret.default_mode.unwrap_or(DEFAULT_MODE);
        return match lookup.secret(name).await? {
            Some(data) => write_keys(target, &data, secret.items.as_deref(), mode),
            None if secret.optional.unwrap_or(false) => Ok(()),
            None => anyhow::bail!("Secret {name:?} not found"),
        };
    }
    if let Some(map) = &volume.config_map {
        let name = &map.name;
        let mode = map.default_mode.unwrap_or(DEFAULT_MODE);
        return match lookup.config_map(name).await? {
            Some(data) => write_keys(target, &data, map.items.as_deref(), mode),
            None if map.optional.unwrap_or(false) => Ok(()),
            None => anyhow::bail!("ConfigMap {name:?} not found"),
        };
    }
    if let Some(downward) = &volume.downward_api {
        let mode = downward.default_mode.unwrap_or(DEFAULT_MODE);
        return write_downward(target, downward.items.as_deref(), mode, facts);
    }
    if let Some(projected) = &volume.projected {
        let mode = projected.default_mode.unwrap_or(DEFAULT_MODE);
        for source in projected.sources.iter().flatten() {
            if let Some(secret) = &source.secret {
                match lookup.secret(&secret.name).await? {
                    Some(data) => write_keys(target, &data, secret.items.as_deref(), mode)?,
                    None if secret.optional.unwrap_or(false) => {}
                    None => anyhow::bail!("Secret {:?} not found", secret.name),
                }
            } else if let Some(map) = &source.config_map {
                match lookup.config_map(&map.name).await? {
                    Some(data) => write_keys(target, &data, map.items.as_deref(), mode)?,
                    None if map.optional.unwrap_or(false) => {}
                    None => anyhow::bail!("ConfigMap {:?} not found", map.name),
                }
            } else if let Some(token) = &source.service_account_token {
                let value = request_token(
                    client,
                    facts,
                    token.audience.clone(),
                    token.expiration_seconds,
                )
                .await?;
                write_file(target, &token.path, value.as_bytes(), mode)?;
            } else if let Some(downward) = &source.downward_api {
                write_downward(target, downward.items.as_deref(), mode, facts)?;
            }
        }
        return Ok(());
    }
    anyhow::bail!(
        "unsupported volume type (the pod runner handles secret, configMap, projected, \
         downwardAPI, emptyDir and hostPath)"
    )
}

/// The host directory of a hostPath volume, as kubelet prepares it: `DirectoryOrCreate`
/// creates it (mode 0755, owned by the runner, like kubelet), `Directory` (or no type) needs
/// it to exist. Files, sockets and devices are refused: the runner mounts directories only.
fn host_directory(source: &HostPathVolumeSource) -> anyhow::Result<PathBuf> {
    let path = Path::new(&source.path);
    anyhow::ensure!(
        path.is_absolute()
            && path
                .components()
                .skip(1)
                .all(|c| matches!(c, Component::Normal(_))),
        "hostPath {:?} must be an absolute path without \"..\"",
        source.path
    );
    match source.type_.as_deref().unwrap_or_default() {
        "DirectoryOrCreate" => {
            if !path.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(HOST_DIR_MODE)
                    .create(path)
                    .and_then(|()| {
                        // Whatever the umask says.
                        std::fs::set_permissions(
                            path,
                            std::fs::Permissions::from_mode(HOST_DIR_MODE),
                        )
                    })
                    .with_context(|| format!("cannot create hostPath {}", path.display()))?;
            }
        }
        "" | "Directory" => {}
        other => anyhow::bail!(
            "hostPath type {other:?} is not supported by the pod runner (only Directory and \
             DirectoryOrCreate)"
        ),
    }
    anyhow::ensure!(
        path.is_dir(),
        "hostPath {} is not a directory on the host",
        path.display()
    );
    Ok(path.to_owned())
}

/// A bound token of the pod's service account, as kubelet requests it for projected volumes.
async fn request_token(
    client: &kube::Client,
    facts: &PodFacts,
    audience: Option<String>,
    expiration_seconds: Option<i64>,
) -> anyhow::Result<String> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &facts.namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.into_iter().collect(),
            expiration_seconds,
            bound_object_ref: Some(k8s_openapi::api::authentication::v1::BoundObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: Some(facts.name.clone()),
                uid: Some(facts.uid.clone()),
            }),
        },
        ..TokenRequest::default()
    };
    let response: TokenRequest = api
        .create_subresource(
            "token",
            &facts.service_account,
            &PostParams::default(),
            &request,
        )
        .await
        .with_context(|| {
            format!(
                "cannot request a token for service account {:?}",
                facts.service_account
            )
        })?;
    Ok(response.status.map(|s| s.token).unwrap_or_default())
}

fn write_keys(
    target: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    mode: i32,
) -> anyhow::Result<()> {
    match items {
        None => {
            for (key, value) in data {
                write_file(target, key, value, mode)?;
            }
        }
        Some(items) => {
            for item in items {
                let value = data
                    .get(&item.key)
                    .with_context(|| format!("key {:?} not found", item.key))?;
                write_file(target, &item.path, value, item.mode.unwrap_or(mode))?;
            }
        }
    }
    Ok(())
}

/// Writes `relative` under `target`, refusing paths that would leave it.
/// Writes downward-API fields, each to its path.
fn write_downward(
    target: &Path,
    items: Option<&[DownwardAPIVolumeFile]>,
    mode: i32,
    facts: &PodFacts,
) -> anyhow::Result<()> {
    for item in items.into_iter().flatten() {
        let field = item
            .field_ref
            .as_ref()
            .context("downwardAPI items need a fieldRef here")?;
        let value = facts.field(&field.field_path)?;
        write_file(
            target,
            &item.path,
            value.as_bytes(),
            item.mode.unwrap_or(mode),
        )?;
    }
    Ok(())
}

fn write_file(target: &Path, relative: &str, value: &[u8], mode: i32) -> anyhow::Result<()> {
    let relative = Path::new(relative);
    anyhow::ensure!(
        relative
            .components()
            .all(|c| matches!(c, Component::Normal(_))),
        "volume path {} must be relative and stay inside the volume",
        relative.display()
    );
    let path = target.join(relative);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&path, value)?;
    let mode = u32::try_from(mode).context("negative file mode")? & 0o777;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_files_with_their_modes_and_items_pick_and_rename() {
        let dir = tempfile::tempdir().unwrap();
        let data = BTreeMap::from([
            ("tls.crt".to_owned(), b"CERT".to_vec()),
            ("tls.key".to_owned(), b"KEY".to_vec()),
        ]);
        write_keys(dir.path(), &data, None, 0o600).unwrap();
        assert_eq!(std::fs::read(dir.path().join("tls.key")).unwrap(), b"KEY");
        let mode = std::fs::metadata(dir.path().join("tls.crt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let items = [KeyToPath {
            key: "tls.crt".into(),
            path: "certs/server.pem".into(),
            mode: None,
        }];
        let picked = tempfile::tempdir().unwrap();
        write_keys(picked.path(), &data, Some(&items), 0o644).unwrap();
        assert_eq!(
            std::fs::read(picked.path().join("certs/server.pem")).unwrap(),
            b"CERT"
        );
        assert!(!picked.path().join("tls.key").exists());
    }

    fn host_path(path: &Path, type_: Option<&str>) -> HostPathVolumeSource {
        HostPathVolumeSource {
            path: path.display().to_string(),
            type_: type_.map(str::to_owned),
        }
    }

    #[test]
    fn host_directories_are_created_for_directory_or_create_only() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("run/cplink");
        let err = host_directory(&host_path(&missing, Some("Directory"))).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        assert!(!missing.exists());

        let created = host_directory(&host_path(&missing, Some("DirectoryOrCreate"))).unwrap();
        assert_eq!(created, missing);
        let mode = std::fs::metadata(&missing).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        // An existing directory is used as it is.
        std::fs::set_permissions(&missing, std::fs::Permissions::from_mode(0o750)).unwrap();
        host_directory(&host_path(&missing, Some("DirectoryOrCreate"))).unwrap();
        host_directory(&host_path(&missing, None)).unwrap();
        let mode = std::fs::metadata(&missing).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o750);
    }

    #[test]
    fn host_paths_other_than_plain_directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        for type_ in [
            "File",
            "FileOrCreate",
            "Socket",
            "CharDevice",
            "BlockDevice",
        ] {
            let err = host_directory(&host_path(&file, Some(type_))).unwrap_err();
            assert!(err.to_string().contains(type_), "{type_}: {err}");
        }
        let err = host_directory(&host_path(&file, Some("DirectoryOrCreate"))).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        let escape = format!("{}/../etc", dir.path().display());
        let err = host_directory(&HostPathVolumeSource {
            path: escape,
            type_: Some("DirectoryOrCreate".into()),
        })
        .unwrap_err();
        assert!(err.to_string().contains(".."), "{err}");
        let err = host_directory(&HostPathVolumeSource {
            path: "relative/dir".into(),
            type_: None,
        })
        .unwrap_err();
        assert!(err.to_string().contains("absolute"), "{err}");
    }

    #[test]
    fn paths_leaving_the_volume_and_missing_item_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_file(dir.path(), "../escape", b"x", 0o644).unwrap_err();
        assert!(err.to_string().contains("inside the volume"), "{err}");
        let err = write_file(dir.path(), "/abs", b"x", 0o644).unwrap_err();
        assert!(err.to_string().contains("relative"), "{err}");
        let items = [KeyToPath {
            key: "absent".into(),
            path: "x".into(),
            mode: None,
        }];
        let err = write_keys(dir.path(), &BTreeMap::new(), Some(&items), 0o644).unwrap_err();
        assert!(err.to_string().contains("absent"), "{err}");
    }
}
