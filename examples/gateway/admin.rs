//! Step 11: an operator tightens the per-client limit live, through the gateway's admin
//! endpoint, and a bad document is refused while the limit in force holds. Step 12: the
//! operator turns shadow mode on in the policy file, watches what the limit would refuse
//! while it refuses nothing, then turns it off and the limit enforces.
//!
//! The admin endpoint lives on its own listener bound to 127.0.0.1, so that only the
//! gateway's own host can reach it, whatever address the public side listens on.
//! `POST /admin/reload` reloads the per-client policy from the body's document, or from
//! the gateway's policy file when the body is empty.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use futures_util::future::join_all;
use palisade::config::Policies;
use palisade::rate_limit::{LocalStore, RateLimitHandle};
use tokio::net::TcpListener;
use tower::BoxError;

use crate::edge::Subject;
use crate::{Call, Report, System};

/// The per-client policy's name in the policy file.
pub(crate) const PER_CLIENT: &str = "per_client";

/// The gateway's policy file, next to this source file.
pub(crate) fn policy_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/gateway/policies.toml")
}

/// Reads a policy document.
pub(crate) fn parse(text: &str) -> Result<Policies, BoxError> {
    Ok(toml::from_str(text)?)
}

/// The policy file the gateway runs on: the one next to this source file (`--serve`, for
/// you to edit), or a copy of it in a temporary directory, which the scripted scenario
/// edits as an operator would and which goes away with it.
pub(crate) struct PolicyFile {
    path: PathBuf,
    /// The temporary directory holding the copy.
    copy_in: Option<PathBuf>,
}

impl PolicyFile {
    pub(crate) fn in_use(serve: bool) -> std::io::Result<Self> {
        if serve {
            return Ok(Self {
                path: policy_file(),
                copy_in: None,
            });
        }
        let directory =
            std::env::temp_dir().join(format!("palisade-gateway-{}", std::process::id()));
        std::fs::create_dir_all(&directory)?;
        let path = directory.join("policies.toml");
        std::fs::copy(policy_file(), &path)?;
        Ok(Self {
            path,
            copy_in: Some(directory),
        })
    }

    pub(crate) fn read(&self) -> std::io::Result<String> {
        std::fs::read_to_string(&self.path)
    }

    /// An operator's edit: `text` replaces the file.
    fn write(&self, text: &str) -> std::io::Result<()> {
        std::fs::write(&self.path, text)
    }
}

impl Drop for PolicyFile {
    fn drop(&mut self) {
        if let Some(directory) = &self.copy_in {
            let _ = std::fs::remove_dir_all(directory);
        }
    }
}

struct Admin {
    per_client: RateLimitHandle<LocalStore<Subject>>,
    policies: Arc<PolicyFile>,
}

/// Serves the admin endpoint on a loopback port.
pub(crate) async fn serve(
    per_client: RateLimitHandle<LocalStore<Subject>>,
    policies: Arc<PolicyFile>,
) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let router = Router::new()
        .route("/admin/reload", post(reload))
        .with_state(Arc::new(Admin {
            per_client,
            policies,
        }));
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(addr)
}

/// Reloads the per-client policy: 200 with the quota now in force (and whether it only
/// watches, in shadow mode), or 422 with the error (the field's path first) and the old
/// policy left in force.
async fn reload(State(admin): State<Arc<Admin>>, body: String) -> (StatusCode, String) {
    let text = if body.trim().is_empty() {
        match admin.policies.read() {
            Ok(text) => text,
            Err(error) => return (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
        }
    } else {
        body
    };
    let reloaded = parse(&text)
        .and_then(|policies| Ok(policies.reload_rate_limit(PER_CLIENT, &admin.per_client)?));
    match reloaded {
        Ok(()) => {
            let quota = admin.per_client.quota();
            let shadow = admin.per_client.is_shadow();
            tracing::info!(?quota, shadow, "gateway: per-client limit reloaded");
            let mode = if shadow {
                ", in shadow mode (counting, refusing nothing)"
            } else {
                ""
            };
            (
                StatusCode::OK,
                format!(
                    "limits.{PER_CLIENT}: capacity {}, one more every {:?}{mode}",
                    quota.capacity(),
                    quota.refill_interval()
                ),
            )
        }
        Err(error) => {
            tracing::warn!(%error, "gateway: reload refused");
            (StatusCode::UNPROCESSABLE_ENTITY, error.to_string())
        }
    }
}

/// POSTs `body` to the admin endpoint.
async fn post_reload(system: &System, body: &str) -> (StatusCode, String) {
    let request = hyper::Request::post(format!("http://{}/admin/reload", system.admin))
        .body(http_body_util::Full::new(hyper::body::Bytes::from(
            body.to_owned(),
        )))
        .expect("a well-formed request");
    match system.client.request(request).await {
        Ok(response) => {
            let status = response.status();
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .map(|body| String::from_utf8_lossy(&body.to_bytes()).into_owned())
                .unwrap_or_default();
            (status, body)
        }
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
    }
}

/// `requests` GETs from `subject` at once: how many went through, how long it took, and
/// the `RateLimit-Policy` of a refused one.
async fn burst(system: &System, subject: &str, requests: usize) -> (usize, f64, String) {
    let started = Instant::now();
    let replies =
        join_all((0..requests).map(|_| system.send(Call::get("/users/1", subject)))).await;
    let elapsed = started.elapsed().as_secs_f64();
    let admitted = replies
        .iter()
        .filter(|reply| reply.status == StatusCode::OK)
        .count();
    let policy = replies
        .iter()
        .find(|reply| reply.status == StatusCode::TOO_MANY_REQUESTS)
        .map_or_else(
            || "-".to_owned(),
            |reply| reply.header("ratelimit-policy").to_owned(),
        );
    (admitted, elapsed, policy)
}

/// The policy file with the per-client limit tightened to 3 requests, one more per 10 s.
fn tightened(file: &str) -> String {
    file.replace("capacity = 10", "capacity = 3")
        .replace("refill = \"5/s\"", "refill = \"1/10s\"")
}

pub(crate) async fn step(system: &System, report: &mut Report) {
    report.section("11. an operator tightens the per-client limit live");
    let file = match system.policies.read() {
        Ok(file) => file,
        Err(error) => return report.check(false, format!("the policy file: {error}")),
    };
    let (admitted, elapsed, _) = burst(system, "grace", 12).await;
    // The file's limit: a burst of 10, then 5 a second.
    let allowed = 10 + (5.0 * elapsed).ceil() as usize;
    report.check(
        (10..=allowed).contains(&admitted),
        format!("under the file's limit (10, then 5/s) grace gets {admitted} of 12 through"),
    );

    let (status, body) = post_reload(system, &tightened(&file)).await;
    report.check(
        status == StatusCode::OK,
        format!("POST /admin/reload with capacity 3, 1/10s: {status} {body}"),
    );
    let (admitted, _, policy) = burst(system, "heidi", 6).await;
    report.check(
        admitted == 3 && policy.contains("q=3;"),
        format!("at once, heidi gets {admitted} of 6 through (a refusal says {policy})"),
    );
    let (admitted, _, _) = burst(system, "grace", 3).await;
    report.check(
        admitted == 0,
        format!("grace, whose bucket was empty, stays empty under the new limit: {admitted} of 3"),
    );

    let invalid = tightened(&file).replace("capacity = 3", "capacity = 0");
    let (status, body) = post_reload(system, &invalid).await;
    report.check(
        status == StatusCode::UNPROCESSABLE_ENTITY
            && body.starts_with("limits.per_client.capacity:"),
        format!("a document with capacity 0 is refused: {status} {body}"),
    );
    let (admitted, _, policy) = burst(system, "ivan", 6).await;
    report.check(
        admitted == 3 && policy.contains("q=3;"),
        format!("the tightened limit still holds: ivan gets {admitted} of 6 through ({policy})"),
    );

    let (status, body) = post_reload(system, "").await;
    let (admitted, elapsed, _) = burst(system, "judy", 12).await;
    let allowed = 10 + (5.0 * elapsed).ceil() as usize;
    report.check(
        status == StatusCode::OK && (10..=allowed).contains(&admitted),
        format!(
            "an empty POST reloads the file: {status} {body}; judy gets {admitted} of 12 through"
        ),
    );
}

/// Writes `text` into the policy file, as an operator edits it, and asks the gateway to
/// reload it (an empty `POST /admin/reload`).
async fn edit_and_reload(system: &System, text: &str) -> (StatusCode, String) {
    if let Err(error) = system.policies.write(text) {
        return (StatusCode::INTERNAL_SERVER_ERROR, error.to_string());
    }
    post_reload(system, "").await
}

pub(crate) async fn shadow_step(system: &System, report: &mut Report) {
    report.section("12. the operator watches a new limit in shadow mode, then enforces it");
    let file = match system.policies.read() {
        Ok(file) => file,
        Err(error) => return report.check(false, format!("the policy file: {error}")),
    };
    let enforced = tightened(&file);
    let watched = enforced.replace("refill = \"1/10s\"", "refill = \"1/10s\"\nshadow = true");
    let (status, body) = edit_and_reload(system, &watched).await;
    report.check(
        status == StatusCode::OK && body.contains("shadow mode"),
        format!("`shadow = true` in the file, and an empty POST /admin/reload: {status} {body}"),
    );
    let before = system.per_client.shadow_rejected();
    let (admitted, _, _) = burst(system, "kim", 6).await;
    let counted = system.per_client.shadow_rejected() - before;
    report.check(
        admitted == 6 && counted == 3,
        format!(
            "kim gets {admitted} of 6 through, and the limit counts {counted} it would have refused"
        ),
    );

    let (status, body) = edit_and_reload(system, &enforced).await;
    report.check(
        status == StatusCode::OK && !body.contains("shadow"),
        format!("`shadow = true` taken out again, and reloaded: {status} {body}"),
    );
    let (admitted, _, policy) = burst(system, "liam", 6).await;
    report.check(
        admitted == 3 && policy.contains("q=3;"),
        format!("enforcing, liam gets {admitted} of 6 through (a refusal says {policy})"),
    );
    let (admitted, _, _) = burst(system, "kim", 2).await;
    report.check(
        admitted == 0,
        format!(
            "kim's bucket, charged in shadow mode as it would have been, is empty: {admitted} of 2"
        ),
    );

    let (status, body) = edit_and_reload(system, &file).await;
    report.check(
        status == StatusCode::OK && body.contains("capacity 10"),
        format!("the file as it was, reloaded: {status} {body}"),
    );
}
