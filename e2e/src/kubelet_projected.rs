//! The kubelet stand-in's API-backed volumes: `secret`, `configMap` and `projected`
//! (service-account token, ConfigMap, Secret and downward-API sources), written as kubelet
//! writes them — `secret` and `projected` on a tmpfs of their own (credentials never touch
//! the disk) under `<kubelet root>/pods/<uid>/volumes/kubernetes.io~<kind>/<name>`, files
//! with the volume's `defaultMode` or the item's `mode`. A service-account token is a
//! bound token from the TokenRequest API, as kubelet asks for it with the node's
//! credentials, so that a Pod's `kube-api-access` volume holds what in-cluster clients read.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::Context;
use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
        core::v1::{ConfigMap, KeyToPath, Pod, Secret, ServiceAccount, Volume},
    },
};
use kube::{Api, api::PostParams};

/// One file of a volume: where below the volume, its bytes and its mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeFile {
    /// Path relative to the volume's directory.
    pub path: PathBuf,
    /// Content.
    pub bytes: Vec<u8>,
    /// Permission bits.
    pub mode: u32,
}

/// The files of an API-backed volume, and the kubelet directory kind it lives in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    /// `kubernetes.io~secret`, `kubernetes.io~configmap` or `kubernetes.io~projected`.
    pub kind: &'static str,
    /// Whether kubelet puts it on a tmpfs (credentials: secrets and projected volumes).
    pub memory: bool,
    /// Its files.
    pub files: Vec<VolumeFile>,
}

/// Fetches what the Pod's `secret`, `configMap` and `projected` volumes hold, by volume
/// name. A missing object fails the Pod's start (kubelet retries), unless it is optional.
pub async fn fetch(client: &kube::Client, pod: &Pod) -> anyhow::Result<BTreeMap<String, Contents>> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let mut out = BTreeMap::new();
    for v in pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default()
    {
        if let Some(c) = contents(client, &ns, pod, &v).await? {
            out.insert(v.name.clone(), c);
        }
    }
    Ok(out)
}

async fn contents(
    client: &kube::Client,
    ns: &str,
    pod: &Pod,
    v: &Volume,
) -> anyhow::Result<Option<Contents>> {
    if let Some(s) = &v.secret {
        let src = Source {
            name: s.secret_name.as_deref().unwrap_or_default(),
            optional: s.optional,
            items: s.items.as_deref(),
            mode: s.default_mode.unwrap_or(0o644),
        };
        return Ok(Some(Contents {
            kind: "kubernetes.io~secret",
            memory: true,
            files: files_of(client, ns, src, secret_entries).await?,
        }));
    }
    if let Some(c) = &v.config_map {
        let src = Source {
            name: &c.name,
            optional: c.optional,
            items: c.items.as_deref(),
            mode: c.default_mode.unwrap_or(0o644),
        };
        return Ok(Some(Contents {
            kind: "kubernetes.io~configmap",
            memory: false,
            files: files_of(client, ns, src, config_map_entries).await?,
        }));
    }
    let Some(p) = &v.projected else {
        return Ok(None);
    };
    let mode = p.default_mode.unwrap_or(0o644);
    let mut files = Vec::new();
    for source in p.sources.clone().unwrap_or_default() {
        if let Some(t) = source.service_account_token {
            let token = token(client, pod, &t.audience, t.expiration_seconds).await?;
            files.push(VolumeFile {
                path: t.path.into(),
                bytes: token.into_bytes(),
                mode: mode as u32,
            });
        }
        if let Some(c) = &source.config_map {
            let src = Source {
                name: &c.name,
                optional: c.optional,
                items: c.items.as_deref(),
                mode,
            };
            files.extend(files_of(client, ns, src, config_map_entries).await?);
        }
        if let Some(s) = &source.secret {
            let src = Source {
                name: &s.name,
                optional: s.optional,
                items: s.items.as_deref(),
                mode,
            };
            files.extend(files_of(client, ns, src, secret_entries).await?);
        }
        if let Some(d) = source.downward_api {
            for item in d.items.unwrap_or_default() {
                let Some(f) = item.field_ref else { continue };
                let value = crate::kubelet_volumes::field(pod, &f.field_path).unwrap_or_default();
                files.push(VolumeFile {
                    path: item.path.into(),
                    bytes: value.into_bytes(),
                    mode: item.mode.unwrap_or(mode) as u32,
                });
            }
        }
    }
    Ok(Some(Contents {
        kind: "kubernetes.io~projected",
        memory: true,
        files,
    }))
}

/// The keys a volume shows: all of them, or the listed `items` at their paths.
fn select(
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    mode: i32,
) -> Vec<VolumeFile> {
    match items {
        None => data
            .iter()
            .map(|(k, v)| VolumeFile {
                path: k.into(),
                bytes: v.clone(),
                mode: mode as u32,
            })
            .collect(),
        Some(items) => items
            .iter()
            .filter_map(|i| {
                Some(VolumeFile {
                    path: i.path.clone().into(),
                    bytes: data.get(&i.key)?.clone(),
                    mode: i.mode.unwrap_or(mode) as u32,
                })
            })
            .collect(),
    }
}

/// Where a volume's files come from: a Secret's or ConfigMap's name, whether it may be
/// missing, the keys it shows (all when `None`) and their default mode.
struct Source<'a> {
    name: &'a str,
    optional: Option<bool>,
    items: Option<&'a [KeyToPath]>,
    mode: i32,
}

/// The files of a Secret's or ConfigMap's keys (`entries` picks them from the object). A
/// missing object shows none when the volume says it is optional, an error otherwise.
async fn files_of<K>(
    client: &kube::Client,
    ns: &str,
    src: Source<'_>,
    entries: fn(K) -> BTreeMap<String, Vec<u8>>,
) -> anyhow::Result<Vec<VolumeFile>>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let name = src.name;
    let data = match Api::<K>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?
    {
        Some(obj) => entries(obj),
        None if src.optional == Some(true) => BTreeMap::new(),
        None => anyhow::bail!("{} {ns}/{name} not found", K::kind(&()).to_lowercase()),
    };
    Ok(select(&data, src.items, src.mode))
}

/// Binary and text entries in one map (text last: a Secret's `stringData` wins).
fn merged(
    binary: Option<BTreeMap<String, ByteString>>,
    text: Option<BTreeMap<String, String>>,
) -> BTreeMap<String, Vec<u8>> {
    binary
        .unwrap_or_default()
        .into_iter()
        .map(|(k, ByteString(v))| (k, v))
        .chain(
            text.unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes())),
        )
        .collect()
}

fn secret_entries(s: Secret) -> BTreeMap<String, Vec<u8>> {
    merged(s.data, s.string_data)
}

fn config_map_entries(c: ConfigMap) -> BTreeMap<String, Vec<u8>> {
    merged(c.binary_data, c.data)
}

/// A token for the Pod's ServiceAccount bound to the Pod, from the TokenRequest API.
async fn token(
    client: &kube::Client,
    pod: &Pod,
    audience: &Option<String>,
    expiration_seconds: Option<i64>,
) -> anyhow::Result<String> {
    let m = &pod.metadata;
    let ns = m.namespace.clone().unwrap_or_default();
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.iter().cloned().collect(),
            expiration_seconds: expiration_seconds.or(Some(3607)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: m.name.clone(),
                uid: m.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let answer = api
        .create_token_request(&sa, &PostParams::default(), &request)
        .await
        .with_context(|| format!("token for service account {ns}/{sa}"))?;
    answer
        .status
        .map(|s| s.token)
        .context("TokenRequest answered without a token")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_pick_keys_and_modes_and_skip_missing_keys() {
        let data = BTreeMap::from([
            ("a".to_owned(), b"1".to_vec()),
            ("b".to_owned(), b"2".to_vec()),
        ]);
        assert_eq!(select(&data, None, 0o400).len(), 2);
        let items = [
            KeyToPath {
                key: "b".into(),
                path: "dir/b.txt".into(),
                mode: Some(0o600),
            },
            KeyToPath {
                key: "zz".into(),
                path: "zz".into(),
                mode: None,
            },
        ];
        assert_eq!(
            select(&data, Some(&items), 0o644),
            [VolumeFile {
                path: "dir/b.txt".into(),
                bytes: b"2".to_vec(),
                mode: 0o600
            }]
        );
    }
}
