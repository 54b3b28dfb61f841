//! podmig's API clients: kube's client without its built-in server retry. kube-client
//! retries every 429, 503 and 504 up to 15 times, backing off up to 1000 s and honouring
//! any `Retry-After` the server sends: behind API priority and fairness or a webhook that
//! answers 429, a daemon or the controller would hang silently for minutes. Without it a
//! busy API server is an error within one round trip, and each caller retries with its own
//! bound: the controller requeues, watches restart, the reporter tries a write a few times
//! ([`crate::node::report`]), trust checks wait until their deadline.

/// A client for `config`, without kube's built-in retry.
pub fn from_config(mut config: kube::Config) -> Result<kube::Client, kube::Error> {
    config.default_retry = false;
    kube::Client::try_from(config)
}

/// A client from the environment (in-cluster, or the local kubeconfig), as
/// `kube::Client::try_default` finds it, without kube's built-in retry.
pub async fn infer() -> Result<kube::Client, kube::Error> {
    let config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    from_config(config)
}

/// Whether a failed API call may succeed when tried again soon: the server was busy,
/// unavailable or timed out (429, 500, 502, 503, 504), or the connection failed.
pub fn is_transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => matches!(status.code, 429 | 500 | 502 | 503 | 504),
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        sync::{
            Arc,
            atomic::{AtomicU32, Ordering},
        },
        time::{Duration, Instant},
    };

    /// An API server that answers every request `429` with `Retry-After: 600`; counts them.
    async fn always_busy() -> (String, Arc<AtomicU32>) {
        let calls = Arc::new(AtomicU32::new(0));
        let seen = calls.clone();
        let app = axum::Router::new().fallback(move || {
            let seen = seen.clone();
            async move {
                seen.fetch_add(1, Ordering::SeqCst);
                (
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "600"), ("content-type", "application/json")],
                    r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"too many requests","reason":"TooManyRequests","code":429}"#,
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, calls)
    }

    #[tokio::test]
    async fn a_busy_api_server_is_an_error_at_once_not_a_wait_of_minutes() {
        let (url, calls) = always_busy().await;
        let config = kube::Config::new(url.parse().expect("url"));
        let client = from_config(config).expect("client");
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(client, "default");
        let started = Instant::now();
        let got = tokio::time::timeout(Duration::from_secs(20), pods.get("p"))
            .await
            .expect("answered within 20 s (kube's own retry would wait out Retry-After: 600)");
        let error = got.expect_err("429");
        assert!(is_transient(&error), "{error}");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "asked once");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn only_busy_or_broken_answers_are_worth_another_try() {
        let status = |code: u16| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..Default::default()
            }))
        };
        assert!(is_transient(&status(429)) && is_transient(&status(503)));
        assert!(!is_transient(&status(404)) && !is_transient(&status(403)));
        assert!(!is_transient(&status(409)));
    }
}
