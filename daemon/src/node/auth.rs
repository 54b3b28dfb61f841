//! Authentication and authorization of the HTTP API, as kubelet does it: the bearer token
//! is checked with a TokenReview, the request with a SubjectAccessReview. Decisions are
//! cached for a short while so a burst of requests costs two API calls, not two each.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::api::PostParams;

/// How long a decision is reused.
const CACHE_TTL: Duration = Duration::from_secs(30);

/// How many decisions are kept at most: random tokens from anyone who reaches the port
/// cannot grow the cache (and each check's walk of it) without bound.
const CACHE_MAX: usize = 4096;

/// What a request does, in RBAC terms.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attributes {
    /// `create`, `get`, `list`.
    pub verb: &'static str,
    /// API group (`""`: the core group).
    pub group: &'static str,
    /// `pods` or `nodes`.
    pub resource: &'static str,
    /// `migrate`, `migrations`, `metrics`, `handover`.
    pub subresource: &'static str,
    /// Namespace (empty for cluster-scoped resources).
    pub namespace: String,
    /// Object name.
    pub name: String,
}

/// Why a request was turned away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No bearer token (401).
    #[error("a bearer token is required")]
    NoToken,
    /// A token the API server does not accept (401), with its TokenReview's reason.
    #[error("the API server does not accept the bearer token: {reason}")]
    Unauthenticated {
        /// What the TokenReview said.
        reason: String,
    },
    /// Known caller, not allowed (403).
    #[error("user {user:?} cannot {verb} resource \"{resource}\"{scope}{why}")]
    Forbidden {
        /// The caller.
        user: String,
        /// The verb asked for.
        verb: &'static str,
        /// `resource[.group][/subresource]`.
        resource: String,
        /// ` in namespace "…"`, or empty.
        scope: String,
        /// `: <the SubjectAccessReview's reason>`, or empty.
        why: String,
    },
    /// The API server could not be asked (503).
    #[error("cannot reach the API server: {reason}")]
    Unavailable {
        /// The client's error.
        reason: String,
    },
}

/// Who called, as the API server knows the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// User name.
    pub name: String,
    /// The node the caller speaks for ([`super::trust::caller_node`]), if any.
    pub node: Option<String>,
}

/// The key of a decision: the token's digest and what it asked.
type DecisionKey = (Vec<u8>, Attributes);

/// Decisions by (token digest, attributes), with when each was taken: reused for
/// [`CACHE_TTL`], at most `max` of them (the oldest goes first when full).
#[derive(Debug)]
struct DecisionCache {
    map: HashMap<DecisionKey, (Instant, Result<Caller, AuthError>)>,
    max: usize,
}

impl Default for DecisionCache {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            max: CACHE_MAX,
        }
    }
}

impl DecisionCache {
    /// A decision taken less than [`CACHE_TTL`] ago; expired ones are dropped.
    fn get(&mut self, key: &DecisionKey) -> Option<Result<Caller, AuthError>> {
        self.map.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
        self.map.get(key).map(|(_, d)| d.clone())
    }

    /// Keeps `decision`, making room by dropping the oldest one when full.
    fn put(&mut self, key: DecisionKey, decision: Result<Caller, AuthError>) {
        if self.map.len() >= self.max && !self.map.contains_key(&key) {
            let oldest = self
                .map
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.map.remove(&k);
            }
        }
        self.map.insert(key, (Instant::now(), decision));
    }
}

/// Checks callers against the API server.
pub struct Authorizer {
    client: kube::Client,
    cache: Mutex<DecisionCache>,
}

impl Authorizer {
    /// An authorizer asking through `client` (needs `create` on tokenreviews and
    /// subjectaccessreviews).
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            cache: Mutex::default(),
        }
    }

    /// The caller when `token` may do `attrs`.
    pub async fn check(
        &self,
        token: Option<&str>,
        attrs: &Attributes,
    ) -> Result<Caller, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::NoToken)?;
        let key = (
            ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
                .as_ref()
                .to_vec(),
            attrs.clone(),
        );
        if let Some(d) = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
        {
            return d;
        }
        let decision = self.ask(token, attrs).await;
        if !matches!(decision, Err(AuthError::Unavailable { .. })) {
            self.cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .put(key, decision.clone());
        }
        decision
    }

    async fn ask(&self, token: &str, attrs: &Attributes) -> Result<Caller, AuthError> {
        let unavailable = |e: kube::Error| AuthError::Unavailable {
            reason: e.to_string(),
        };
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let reviewed = kube::Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(unavailable)?;
        let status = reviewed.status.unwrap_or_default();
        let user = status
            .user
            .filter(|_| status.authenticated == Some(true))
            .ok_or_else(|| AuthError::Unauthenticated {
                reason: status.error.unwrap_or_else(|| "it is not valid".into()),
            })?;
        let caller = Caller {
            name: user.username.clone().unwrap_or_default(),
            node: super::trust::caller_node(&user),
        };
        let name = caller.name.clone();
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(attrs.verb.into()),
                    resource: Some(attrs.resource.into()),
                    subresource: Some(attrs.subresource.into()),
                    namespace: (!attrs.namespace.is_empty()).then(|| attrs.namespace.clone()),
                    name: (!attrs.name.is_empty()).then(|| attrs.name.clone()),
                    group: Some(attrs.group.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let decided = kube::Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &sar)
            .await
            .map_err(unavailable)?;
        let s = decided.status.unwrap_or_default();
        if s.allowed {
            Ok(caller)
        } else {
            let ns = if attrs.namespace.is_empty() {
                String::new()
            } else {
                format!(" in namespace {:?}", attrs.namespace)
            };
            let resource = match (attrs.group, attrs.subresource) {
                ("", "") => attrs.resource.to_owned(),
                ("", sub) => format!("{}/{sub}", attrs.resource),
                (group, "") => format!("{}.{group}", attrs.resource),
                (group, sub) => format!("{}.{group}/{sub}", attrs.resource),
            };
            Err(AuthError::Forbidden {
                user: name,
                verb: attrs.verb,
                resource,
                scope: ns,
                why: s
                    .reason
                    .filter(|r| !r.is_empty())
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> DecisionKey {
        (
            vec![n],
            Attributes {
                verb: "create",
                group: "",
                resource: "pods",
                subresource: "migrate",
                namespace: "default".into(),
                name: "p".into(),
            },
        )
    }

    #[test]
    fn random_tokens_cannot_grow_the_cache_past_its_bound() {
        let mut cache = DecisionCache {
            map: HashMap::new(),
            max: 3,
        };
        let no = |n: u8| {
            Err(AuthError::Unauthenticated {
                reason: format!("token {n}"),
            })
        };
        for n in 0..10u8 {
            cache.put(key(n), no(n));
            #[allow(clippy::disallowed_methods)] // distinct instants for "oldest"
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(cache.map.len(), 3);
        // The newest stay; the oldest went first.
        assert_eq!(cache.get(&key(9)), Some(no(9)));
        assert_eq!(cache.get(&key(7)), Some(no(7)));
        assert_eq!(cache.get(&key(0)), None);
        // A known key is replaced in place, dropping nothing.
        let ok = Ok(Caller {
            name: "alice".into(),
            node: None,
        });
        cache.put(key(9), ok.clone());
        assert_eq!(cache.map.len(), 3);
        assert_eq!(cache.get(&key(9)), Some(ok));
        assert_eq!(cache.get(&key(8)), Some(no(8)));
    }
}
